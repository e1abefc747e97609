#!/usr/bin/env python3
"""GPU check of the megatron CogVideoX against diffusers: correctness in bf16, the Transformer Engine
path, and speed (forward + backward time, peak memory, model TFLOP/s and MFU).

Run on the device machine through ``tools/gpu_check.sh`` (which installs the carried wheels); see
docs/gpu_check.md. ``--dry-run`` runs every code path on the CPU at tiny sizes (fp32, host timers),
so that this script is exercised where there is no GPU.

Sections (each in its own try/except: an error is recorded in the JSON and the next one runs; the
JSON is rewritten after every section, so a run killed at its time limit keeps what it finished):

- ``env``: versions, the GPU, SDPA backend switches, whether Transformer Engine imports (and why not).
- ``matmul_peak``: an 8192^3 bf16 matrix product, the practical ceiling MFU is also quoted against.
- ``correctness.<2b|5b>``: a random diffusers ``CogVideoXTransformer3DModel`` at real width (head
  dim 64, hidden 1920 / 3072, text length 226, text width 4096) with a few layers, every weight
  perturbed, saved with ``save_pretrained`` and loaded by ``build_model_from_hf(impl='local')``.
  On a latent of 13x60x90 (17,776 tokens) it compares the output and the input gradients of
  ours-bf16 and diffusers-bf16 against an fp32 reference (diffusers, TF32 off), and ours-fp32
  against the same reference. Metric: ||a - b|| / ||b|| (Frobenius).
- ``te``: the same with ``impl='te'`` (TP = 1) where Transformer Engine imports; else the reason.
- ``speed``: a slice of CogVideoX-2b (4 blocks at real width, 226 + 13*30*45 = 17,776 tokens,
  batch 1, bf16): forward and forward+backward time (CUDA events, median of several iterations
  after warm-up) and peak memory, ours vs diffusers (plain and with fused QKV), under the default
  SDPA backend and under each of flash / cuDNN / memory-efficient forced; which SDPA kernel the
  default picks (read from the profiler's aten op names).
- ``sdpa``: the attention alone at the same shape for each backend.
- ``trainer``: the product end to end on the device: a tiny CogVideoX ADM run (bf16, bf16 weights,
  an fp32 EMA that must move) with samples
  during the run and at its end, its export and throughput metrics (MFU), then ``adm-megatron
  sample`` of the exported generator (bf16).
- ``decode_memory``: the memory plan's fake-tensor count of the samples' VAE decode against the
  CUDA allocator's peak (CogVideoX's VAE, 13 x 30 x 45 latents, bf16, whole and tiled).
- ``offload``: a tiny ADM run with every network offloaded (optimizer state and weights) against
  the same run without: losses, weights and the checkpoint's optimizer state; the host-copy race
  that ``Offloader.settle`` closes before a checkpoint reads the host buffers; the same
  checkpoint written in the background (``train.async_save``) while an iteration runs; and the
  memory plan's host terms against the pinned host buffers' bytes.

FLOP count (model FLOPs, a multiply-add = 2 FLOPs, no recompute), per block with N = text + video
tokens, hidden d, MLP width 4d, batch B:
    forward = B * (24 N d^2 + 4 N^2 d)
      24 N d^2: QKV 6 N d^2, attention output projection 2 N d^2, MLP 2 * 8 N d^2
      4 N^2 d : Q K^T 2 N^2 d and P V 2 N^2 d (full, non-causal attention over all N tokens)
    plus, per model: text projection 2 B L_text D_text d, patch embedding 2 B N_video (C p^2) d,
    output projection 2 B N_video d (p^2 C_out), adaLN linears 2 B T (6 d) per norm (T: time
    embedding width).
    forward + backward = 3 x forward (backward: gradients of inputs and of weights).
MFU = achieved FLOP/s / the card's dense BF16 peak (H100 SXM / H200: 989 TFLOP/s; also quoted
against the measured matmul ceiling).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start / stop chatter
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402

from adm_megatron.precision import fp32_highest  # noqa: E402

# Dense (non-sparse) BF16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. More specific names
# first ("H100 PCIe" before "H100").
DATASHEET_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]

SDPA_BACKENDS = ("flash", "cudnn", "efficient")


# ------------------------------------------------------------------------------------------------
# Sizes


def _tiny(**extra):
    base = dict(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
    )
    base.update(extra)
    return base


@dataclasses.dataclass
class Plan:
    device: torch.device
    low_dtype: torch.dtype  # the precision under test (bf16 on the GPU)
    ref_dtype: torch.dtype  # the reference's precision (fp32 with TF32 off on the GPU)
    ours_ref_dtype: torch.dtype  # ours in full precision (fp32; megatron has no fp64 path)
    variants: dict  # name -> diffusers config (no _class_name) for the correctness checks
    latent: tuple  # (frames, height, width) of the correctness latent
    speed_config: dict
    speed_latent: tuple
    batch: int
    warmup: int
    iters: int
    matmul_n: int
    dry_run: bool


def make_plan(args) -> Plan:
    from adm_megatron.families.cogvideox_presets import COGVIDEOX_2B, COGVIDEOX_5B

    def real(preset, layers):
        cfg = {k: v for k, v in preset.items() if k != "_class_name"}
        cfg["num_layers"] = layers
        return cfg

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    if args.dry_run:
        device = torch.device("cpu")
        variants = {
            "2b": _tiny(num_layers=args.correct_layers),
            "5b": _tiny(num_layers=args.correct_layers, attention_head_dim=16,
                        use_rotary_positional_embeddings=True),
        }
        plan = Plan(
            device=device, low_dtype=dtypes[args.dtype or "fp32"], ref_dtype=torch.float64,
            ours_ref_dtype=torch.float32,
            variants=variants, latent=(3, 8, 8),
            speed_config=_tiny(num_layers=args.speed_layers), speed_latent=(3, 8, 8), batch=1,
            warmup=1, iters=2, matmul_n=256, dry_run=True,
        )
    else:
        if args.cpu:  # the real-width code path on the CPU (pre-flight; pass a small --latent)
            device = torch.device("cpu")
        elif not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run (or --cpu) on a machine without a GPU")
        else:
            device = torch.device("cuda", torch.cuda.current_device())
        latent = tuple(int(x) for x in args.latent.split(","))
        plan = Plan(
            device=device, low_dtype=dtypes[args.dtype or "bf16"], ref_dtype=torch.float32,
            ours_ref_dtype=torch.float32,
            variants={"2b": real(COGVIDEOX_2B, args.correct_layers),
                      "5b": real(COGVIDEOX_5B, args.correct_layers)},
            latent=latent, speed_config=real(COGVIDEOX_2B, args.speed_layers), speed_latent=latent,
            batch=1, warmup=args.warmup, iters=args.iters,
            matmul_n=8192 if device.type == "cuda" else 1024, dry_run=False,
        )
    if args.variants:
        keep = args.variants.split(",")
        plan.variants = {k: v for k, v in plan.variants.items() if k in keep}
    return plan


# ------------------------------------------------------------------------------------------------
# Bookkeeping


class Budget:
    def __init__(self, total_s: float):
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


class Report:
    """The JSON record, rewritten (atomically) after each section."""

    def __init__(self, path: str, budget: Budget):
        self.path = path
        self.budget = budget
        self.data = {"script": "tools/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "budget_s": budget.total_s, "sections": {}, "errors": {}, "skipped": {}}

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed(), 2)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

    def run(self, name: str, fn, need_s: float = 0.0):
        """Run one section: its result, or its error / the reason it was skipped, goes in the JSON."""
        if self.budget.left() < need_s:
            reason = f"time budget: {self.budget.left():.0f} s left, the section needs about {need_s:.0f} s"
            self.data["skipped"][name] = reason
            log(f"[{name}] skipped ({reason})")
            self.save()
            return None
        log(f"[{name}] start ({self.budget.left():.0f} s of budget left)")
        t0 = time.monotonic()
        result = None
        try:
            result = fn()
            self.data["sections"][name] = result
        except Exception as exc:  # record and go on: one failure must not lose the rest
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            log(f"[{name}] ERROR {type(exc).__name__}: {exc}")
        finally:
            _free_memory()
        log(f"[{name}] done in {time.monotonic() - t0:.1f} s")
        self.save()
        return result


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_context(backend: str):
    """'default' leaves torch's choice; otherwise only that SDPA backend is allowed."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[backend]])


def time_it(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Median / mean / min milliseconds per call (CUDA events on a GPU, host clock on CPU) and the
    peak memory allocated during the timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        base = peak = None
    out = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
           "min_ms": min(times), "iters": iters, "warmup": warmup}
    if peak is not None:
        out["peak_gib"] = peak / 2**30
        out["resident_before_gib"] = base / 2**30
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# Environment


def _version(module_name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module_name)
    except Exception:
        return None


def te_status() -> dict:
    from adm_megatron.models.specs import transformer_engine_available

    available = transformer_engine_available()
    out = {"available": available}
    if not available:
        try:
            import transformer_engine.pytorch  # noqa: F401

            out["reason"] = "transformer_engine.pytorch imports, but CUDA is not available"
        except Exception as exc:
            out["reason"] = f"TE not importable: {type(exc).__name__}: {exc}"
    else:
        out["version"] = _version("transformer_engine") or _version("transformer-engine")
    return out


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:
        return None
    return ".".join(map(str, version)) if isinstance(version, (tuple, list)) else str(version)


def datasheet_peak_tflops(name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def section_env(plan: Plan, parallel_info) -> dict:
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "megatron_core": _version("megatron-core") or _version("megatron_core"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "huggingface_hub": _version("huggingface_hub") or _version("huggingface-hub"),
        "dry_run": plan.dry_run,
        "low_dtype": str(plan.low_dtype),
        "ref_dtype": str(plan.ref_dtype),
        "parallel": {"backend": parallel_info.backend, "layout": parallel_info.layout,
                     "device": str(parallel_info.device)},
        "transformer_engine": te_status(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(plan.device)
        name = torch.cuda.get_device_name(plan.device)
        env["gpu"] = {
            "name": name,
            "capability": list(torch.cuda.get_device_capability(plan.device)),
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": _nccl_version(),
            "datasheet_bf16_dense_tflops": datasheet_peak_tflops(name),
        }
        env["sdpa_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    return env


def section_matmul_peak(plan: Plan) -> dict:
    n = plan.matmul_n
    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    g = torch.Generator(device=plan.device).manual_seed(0)
    a = torch.randn(n, n, device=plan.device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=plan.device, dtype=dtype, generator=g)
    t = time_it(lambda: torch.mm(a, b), plan.device, warmup=3, iters=10)
    tflops = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    return {"n": n, "dtype": str(dtype), "median_ms": t["median_ms"], "tflops": tflops}


# ------------------------------------------------------------------------------------------------
# Correctness


def make_diffusers_model(config: dict, device: torch.device, seed: int):
    """A random diffusers CogVideoX (fp32) with every weight perturbed: diffusers zero-initialises
    biases, and a mapping mistake on a zero tensor would go unseen. Weights get noise of 1/sqrt(fan
    in) (the scale of their default init), vectors 0.05."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**config)
    model.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = 1.0 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.05
            param.add_(scale * torch.randn(param.shape, device=device, dtype=param.dtype, generator=g))
    return model


@dataclasses.dataclass
class Inputs:
    latents: torch.Tensor
    text: torch.Tensor
    timestep: torch.Tensor
    rotary: tuple | None
    weight: torch.Tensor


def make_inputs(config: dict, batch: int, latent: tuple, device: torch.device, seed: int) -> Inputs:
    from adm_megatron.models import CogVideoXArch
    from adm_megatron.models.rotary import cogvideox_rotary_emb

    arch = CogVideoXArch.from_diffusers_config(config)
    frames, height, width = latent
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, arch.in_channels, height, width, generator=g)
    text = torch.randn(batch, arch.max_text_seq_length, arch.text_embed_dim, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    weight = torch.randn(batch, frames, arch.out_channels, height, width, generator=g)
    rotary = cogvideox_rotary_emb(arch, frames, height, width, device=device)
    return Inputs(latents.to(device), text.to(device), timestep.to(device), rotary, weight.to(device))


def forward(model, inputs: Inputs, dtype: torch.dtype, latents=None, text=None):
    latents = inputs.latents.to(dtype) if latents is None else latents
    text = inputs.text.to(dtype) if text is None else text
    return model(hidden_states=latents, encoder_hidden_states=text, timestep=inputs.timestep,
                 image_rotary_emb=inputs.rotary, return_dict=False)[0]


def output_and_input_grads(model, inputs: Inputs, dtype: torch.dtype) -> dict:
    """Output, d(sum(out * w))/d latents and /d text, as float64 CPU tensors."""
    model.zero_grad(set_to_none=True)
    # fresh leaves: .to() of a tensor already in ``dtype`` would hand back the shared input itself
    latents = inputs.latents.detach().to(dtype, copy=True).requires_grad_(True)
    text = inputs.text.detach().to(dtype, copy=True).requires_grad_(True)
    out = forward(model, inputs, dtype, latents, text)
    (out.double() * inputs.weight.double()).sum().backward()
    result = {"out": out.detach().double().cpu(), "d_latents": latents.grad.double().cpu(),
              "d_text": text.grad.double().cpu()}
    model.zero_grad(set_to_none=True)
    for name, tensor in result.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"{name} has non-finite values ({dtype})")
    return result


def compare(results: dict, reference: dict, dtype: torch.dtype) -> dict:
    """{'dtype', and per tensor (out, d_latents, d_text): rel_l2, rel_max} against the reference."""
    entry = {"dtype": _short(dtype)}
    for name in reference:
        entry[name] = {"rel_l2": rel_l2(results[name], reference[name]),
                       "rel_max": rel_max(results[name], reference[name])}
    return entry


_TENSORS = ("out", "d_latents", "d_text")


class CorrectnessState:
    """Per variant: the diffusers directory and the reference results (kept for the TE section)."""

    def __init__(self, plan: Plan, workdir: str):
        self.plan = plan
        self.workdir = workdir
        self.dirs: dict[str, str] = {}
        self.refs: dict[str, dict] = {}
        self.inputs: dict[str, Inputs] = {}

    def prepare(self, variant: str) -> None:
        if variant in self.refs:
            return
        plan = self.plan
        config = plan.variants[variant]
        path = os.path.join(self.workdir, f"cogvideox-{variant}-{config['num_layers']}l")
        t0 = time.monotonic()
        model = make_diffusers_model(config, plan.device, seed=10)
        model.to("cpu").save_pretrained(path)  # safetensors from host memory
        model.to(plan.device)
        log(f"  {variant}: random diffusers model saved to {path} ({time.monotonic() - t0:.1f} s, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)")
        inputs = make_inputs(config, plan.batch, plan.latent, plan.device, seed=11)
        model.to(plan.ref_dtype)
        with fp32_highest():
            self.refs[variant] = output_and_input_grads(model, inputs, plan.ref_dtype)
        del model
        _free_memory()
        self.dirs[variant] = path
        self.inputs[variant] = inputs

    def diffusers_low(self, variant: str) -> dict:
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel.from_pretrained(self.dirs[variant])
        model.to(device=self.plan.device, dtype=self.plan.low_dtype)
        result = output_and_input_grads(model, self.inputs[variant], self.plan.low_dtype)
        del model
        _free_memory()
        return result

    def ours(self, variant: str, impl: str, dtype: torch.dtype) -> dict:
        from adm_megatron.models import build_model_from_hf

        model = build_model_from_hf(self.dirs[variant], params_dtype=dtype, impl=impl)
        with fp32_highest() if dtype in (torch.float32, torch.float64) else contextlib.nullcontext():
            result = output_and_input_grads(model, self.inputs[variant], dtype)
        del model
        _free_memory()
        return result


def _bf16_ok(ours_err: float, diffusers_err: float) -> bool:
    """Ours in low precision is as close to the reference as diffusers in the same precision
    (with slack for rounding noise), and close in absolute terms."""
    return ours_err <= 1.5 * diffusers_err + 5e-3 and ours_err <= 5e-2


def section_correctness(state: CorrectnessState, variant: str) -> dict:
    plan = state.plan
    config = plan.variants[variant]
    state.prepare(variant)
    ref = state.refs[variant]
    low, full = plan.low_dtype, plan.ours_ref_dtype
    compared = {
        "diffusers_low": compare(state.diffusers_low(variant), ref, low),
        "ours_local_low": compare(state.ours(variant, "local", low), ref, low),
        "ours_local_full": compare(state.ours(variant, "local", full), ref, full),
    }
    frames, height, width = plan.latent
    tokens = config["max_text_seq_length"] + frames * (height // config["patch_size"]) * (
        width // config["patch_size"])
    low_ok = all(_bf16_ok(compared["ours_local_low"][k]["rel_l2"], compared["diffusers_low"][k]["rel_l2"])
                 for k in _TENSORS)
    ref_tol = 1e-4  # fp32 against fp32 (TF32 off) or fp64: rounding only
    ref_ok = all(compared["ours_local_full"][k]["rel_l2"] <= ref_tol for k in _TENSORS)
    return {
        "config": {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                          "max_text_seq_length", "text_embed_dim",
                                          "use_rotary_positional_embeddings") if k in config},
        "hidden_size": config["num_attention_heads"] * config["attention_head_dim"],
        "latent": list(plan.latent),
        "tokens": tokens,
        "metric": "||x - ref|| / ||ref|| (Frobenius) and max|x - ref| / max|ref|",
        "reference": f"diffusers in {_short(plan.ref_dtype)} (TF32 off)",
        "compared": compared,
        "ok_low": low_ok,
        "ok_low_rule": "ours_low <= 1.5 * diffusers_low + 5e-3 and <= 5e-2, for out and both input grads",
        "ok_full": ref_ok,
        "full_tolerance": ref_tol,
        "ok": low_ok and ref_ok,
    }


def section_te(state: CorrectnessState) -> dict:
    from adm_megatron.models.specs import transformer_engine_available

    status = te_status()
    if not transformer_engine_available():
        return {"status": "skipped", **status}
    plan = state.plan
    low, full = plan.low_dtype, plan.ours_ref_dtype
    out = {"status": "ran", **status, "variants": {}}
    for variant in plan.variants:
        state.prepare(variant)
        ref = state.refs[variant]
        compared = {
            "ours_local_low": compare(state.ours(variant, "local", low), ref, low),
            "ours_te_low": compare(state.ours(variant, "te", low), ref, low),
        }
        entry = {"compared": compared}
        entry["ok_low"] = all(_bf16_ok(compared["ours_te_low"][k]["rel_l2"],
                                       compared["ours_local_low"][k]["rel_l2"]) for k in _TENSORS)
        try:  # TE in fp32 may use TF32 GEMMs: a looser bound than the local path's
            compared["ours_te_full"] = compare(state.ours(variant, "te", full), ref, full)
            entry["ok_full"] = all(compared["ours_te_full"][k]["rel_l2"] <= 1e-3 for k in _TENSORS)
        except Exception as exc:
            entry["full_error"] = f"{type(exc).__name__}: {exc}"
            entry["ok_full"] = False
        entry["ok"] = entry["ok_low"] and entry["ok_full"]
        out["variants"][variant] = entry
    return out


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}[dtype]


# ------------------------------------------------------------------------------------------------
# Speed


def cogvideox_flops(config: dict, batch: int, latent: tuple, num_layers: int | None = None) -> dict:
    """Model FLOPs of one forward and one forward + backward (see the module docstring)."""
    layers = config["num_layers"] if num_layers is None else num_layers
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p = config["patch_size"]
    frames, height, width = latent
    n_video = frames * (height // p) * (width // p)
    n_text = config["max_text_seq_length"]
    n = n_text + n_video
    temb = config["time_embed_dim"]
    out_ch = config.get("out_channels") or config["in_channels"]
    block_linear = 24 * n * d * d
    block_attention = 4 * n * n * d
    block_adaln = 2 * 2 * temb * 6 * d
    per_block = block_linear + block_attention + block_adaln
    embed = (2 * n_text * config["text_embed_dim"] * d + 2 * n_video * config["in_channels"] * p * p * d
             + 2 * n_video * d * p * p * out_ch + 2 * temb * 2 * d)
    fwd = batch * (layers * per_block + embed)
    return {
        "tokens": n, "text_tokens": n_text, "video_tokens": n_video, "hidden": d, "layers": layers,
        "forward_flops": fwd, "forward_backward_flops": 3 * fwd,
        "attention_share": layers * block_attention / (layers * per_block + embed),
        "formula": "fwd = B*(layers*(24*N*d^2 + 4*N^2*d + 24*T*d) + embeddings); fwd+bwd = 3*fwd",
    }


def sdpa_ops_used(fn) -> list[str]:
    """The aten scaled-dot-product ops one call of ``fn`` dispatches (names give the backend)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name})


def backend_of(op_names: list[str]) -> str:
    joined = " ".join(op_names)
    for key, name in (("cudnn_attention", "cudnn"), ("flash_attention", "flash"),
                      ("efficient_attention", "efficient"), ("attention_math", "math")):
        if key in joined:
            return name
    return "unknown" if op_names else "none seen"


def section_speed(plan: Plan, budget: Budget, datasheet: float | None, matmul: float | None) -> dict:
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.models import CogVideoXArch, build_model

    config = plan.speed_config
    dtype = plan.low_dtype
    device = plan.device
    flops = cogvideox_flops(config, plan.batch, plan.speed_latent)
    inputs = make_inputs(config, plan.batch, plan.speed_latent, device, seed=21)

    ours = build_model(CogVideoXArch.from_diffusers_config(config), params_dtype=dtype, impl="local")
    ours.train()
    torch.manual_seed(22)
    with torch.device(device):
        theirs = CogVideoXTransformer3DModel(**config)
    theirs.to(device=device, dtype=dtype).train()
    fused = None

    def fwd(model):
        with torch.no_grad():
            return forward(model, inputs, dtype)

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        out = forward(model, inputs, dtype)
        (out.float() * inputs.weight).mean().backward()

    result = {"flops": flops, "batch": plan.batch, "latent": list(plan.speed_latent),
              "dtype": str(dtype), "runs": [], "errors": {}}
    result["default_sdpa_ops"] = {
        "ours_forward_backward": sdpa_ops_used(lambda: fwd_bwd(ours)),
        "diffusers_forward_backward": sdpa_ops_used(lambda: fwd_bwd(theirs)),
    }
    result["default_sdpa_backend"] = {k: backend_of(v) for k, v in result["default_sdpa_ops"].items()}

    plans = [("ours", "default"), ("diffusers", "default"), ("diffusers_fused_qkv", "default")]
    plans += [(impl, b) for b in SDPA_BACKENDS for impl in ("ours", "diffusers")]
    for impl, backend in plans:
        if budget.left() < 15:
            result["errors"][f"{impl}/{backend}"] = "skipped: time budget"
            continue
        try:
            if impl == "diffusers_fused_qkv" and fused is None:
                theirs.fuse_qkv_projections()
                fused = True
            elif impl == "diffusers" and fused:
                theirs.unfuse_qkv_projections()
                fused = False
            model = ours if impl == "ours" else theirs
            with sdpa_context(backend):
                f = time_it(lambda: fwd(model), device, plan.warmup, plan.iters)
                fb = time_it(lambda: fwd_bwd(model), device, plan.warmup, plan.iters)
                ops = sdpa_ops_used(lambda: fwd(model)) if backend == "default" else None
            row = {"impl": impl, "sdpa": backend, "forward": f, "forward_backward": fb}
            if ops is not None:
                row["sdpa_ops_forward"] = ops
            for key, t, n_flops in (("forward", f, flops["forward_flops"]),
                                    ("forward_backward", fb, flops["forward_backward_flops"])):
                tflops = n_flops / (t["median_ms"] * 1e-3) / 1e12
                row[key]["tflops"] = tflops
                row[key]["mfu_datasheet"] = tflops / datasheet if datasheet else None
                row[key]["mfu_measured_matmul"] = tflops / matmul if matmul else None
            result["runs"].append(row)
            log(f"  {impl:20s} sdpa={backend:9s} fwd {f['median_ms']:8.2f} ms  "
                f"fwd+bwd {fb['median_ms']:8.2f} ms  {row['forward_backward']['tflops']:7.1f} TFLOP/s")
        except Exception as exc:
            result["errors"][f"{impl}/{backend}"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            log(f"  {impl} sdpa={backend}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            _free_memory()
    del ours, theirs
    by_key = {(r["impl"], r["sdpa"]): r for r in result["runs"]}
    result["diffusers_over_ours_forward_backward"] = {
        backend: by_key[("diffusers", backend)]["forward_backward"]["median_ms"]
        / by_key[("ours", backend)]["forward_backward"]["median_ms"]
        for backend in ("default",) + SDPA_BACKENDS
        if ("ours", backend) in by_key and ("diffusers", backend) in by_key
    }
    return result


def section_decode_memory(plan: Plan, workdir: str) -> dict:
    """The memory plan's count of the samples' VAE decode (``memory/sample_decode.py``, on fake
    tensors) against the CUDA allocator's peak for the same decode: CogVideoX's VAE at its real
    architecture (random weights), one sample of 13 x 30 x 45 latents in bf16, whole and tiled. (Dry
    run: the tiny VAE at 3 x 8 x 8 in fp32, measured with the profiler; the CPU's conv workspaces,
    which the count leaves out, make the ratio meaningless there.)"""
    from diffusers import AutoencoderKLCogVideoX

    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import VAE as TINY_VAE
    from adm_megatron.families.cogvideox import COGVIDEOX
    from adm_megatron.memory.measure import peak_during
    from adm_megatron.memory.sample_decode import count_sample_decode
    from adm_megatron.train.samples import decoded_pixels, sample_vae

    vae_dir = os.path.join(workdir, "decode_vae")
    if plan.dry_run:
        vae = AutoencoderKLCogVideoX(**TINY_VAE)
        latent, dtype = (3, 4, 8, 8), "fp32"
    else:
        vae, latent, dtype = AutoencoderKLCogVideoX(), (13, 16, 30, 45), "bf16"
    vae.save_config(vae_dir)
    rows = {}
    for tiled in (False, True):
        config = load_config(None, ["model.teacher=unused", f"model.dtype={dtype}",
                                    f"train.sample_vae_tiling={str(tiled).lower()}"])
        counted = count_sample_decode(config, COGVIDEOX, latent, vae_dir)
        model = sample_vae(vae, config).to(plan.device)
        z = torch.randn(1, *latent, device=plan.device, dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            if plan.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                decoded_pixels(COGVIDEOX, model, z)
                torch.cuda.synchronize()
                measured = torch.cuda.max_memory_allocated() - base
            else:
                measured = peak_during(lambda: decoded_pixels(COGVIDEOX, model, z))
        rows["tiled" if tiled else "whole"] = {
            "counted_bytes": counted.decode_peak, "measured_bytes": measured,
            "measured_over_counted": measured / counted.decode_peak, "vae_bytes": counted.vae_bytes}
        log(f"  decode {'tiled' if tiled else 'whole'}: counted {counted.decode_peak / 2**30:.3f} GiB, "
            f"measured {measured / 2**30:.3f} GiB")
    ok = plan.dry_run or all(0.8 <= r["measured_over_counted"] <= 1.5 for r in rows.values())
    return {"ok": ok, "latent": list(latent), "dtype": dtype, "rows": rows}


def section_sdpa(plan: Plan, budget: Budget) -> dict:
    """The attention alone at the speed slice's shape, per backend, contiguous [b, h, s, d] and the
    permuted [s, b, h, d] view ours passes."""
    config = plan.speed_config
    p = config["patch_size"]
    frames, height, width = plan.speed_latent
    n = config["max_text_seq_length"] + frames * (height // p) * (width // p)
    heads, head_dim, b = config["num_attention_heads"], config["attention_head_dim"], plan.batch
    g = torch.Generator(device=plan.device).manual_seed(31)
    fwd_flops = 4 * b * heads * n * n * head_dim
    out = {"shape_bhsd": [b, heads, n, head_dim], "dtype": str(plan.low_dtype),
           "flops_forward": fwd_flops, "flops_forward_backward": 3 * fwd_flops, "runs": [],
           "errors": {}}

    def tensors(layout):
        if layout == "bhsd":
            shape, perm = (b, heads, n, head_dim), (0, 1, 2, 3)
        else:  # sbhd storage, permuted as SDPACoreAttention does
            shape, perm = (n, b, heads, head_dim), (1, 2, 0, 3)
        return [torch.randn(shape, device=plan.device, dtype=plan.low_dtype, generator=g)
                .permute(*perm).requires_grad_(True) for _ in range(3)]

    for backend in ("default",) + SDPA_BACKENDS:
        for layout in ("bhsd", "sbhd"):
            if budget.left() < 5:
                out["errors"][f"{backend}/{layout}"] = "skipped: time budget"
                continue
            try:
                q, k, v = tensors(layout)
                sdpa = torch.nn.functional.scaled_dot_product_attention

                def fwd():
                    with torch.no_grad():
                        sdpa(q, k, v)

                def fwd_bwd():
                    sdpa(q, k, v).sum().backward()

                with sdpa_context(backend):
                    f = time_it(fwd, plan.device, plan.warmup, plan.iters)
                    fb = time_it(fwd_bwd, plan.device, plan.warmup, plan.iters)
                    ops = sdpa_ops_used(fwd)
                out["runs"].append({
                    "sdpa": backend, "layout": layout, "ops": ops, "forward_ms": f["median_ms"],
                    "forward_backward_ms": fb["median_ms"],
                    "forward_tflops": fwd_flops / (f["median_ms"] * 1e-3) / 1e12,
                    "forward_backward_tflops": 3 * fwd_flops / (fb["median_ms"] * 1e-3) / 1e12,
                })
            except Exception as exc:
                out["errors"][f"{backend}/{layout}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                _free_memory()
    return out


# ------------------------------------------------------------------------------------------------
# Summary


def _fmt(x, spec=".2e"):
    return "-" if x is None else format(x, spec)


def section_trainer(plan: Plan, workdir: str) -> dict:
    """The product end to end on this device: a tiny CogVideoX ADM run (3 iterations; bf16 with bf16
    weights on a GPU, whose generator EMA must be fp32 and move)
    with samples rendered during the run and at its end (the VAE decode on the device), the export
    with its distillation.json and the throughput keys in metrics.jsonl (MFU where the card's peak is
    known); then ``adm-megatron sample`` of the exported generator beside the teacher (bf16 on a GPU)."""
    from adm_megatron.cli import main as cli_main
    from adm_megatron.config import load_config
    from adm_megatron.convert.distillation_record import read_distillation_record
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline = build_tiny_pipeline(os.path.join(workdir, "trainer_pipe"), seed=0)
    out = os.path.join(workdir, "trainer_run")
    dtype = "fp32" if plan.dry_run else "bf16"
    config = load_config(os.path.join(REPO, "examples", "cogvideox", "tiny_cpu.yaml"), [
        f"model.teacher={pipeline}", f"output_dir={out}", f"model.dtype={dtype}", "data.source=synthetic",
        "data.num_prompts=4", "data.batch_size=2", "train.max_iterations=3", "train.sample_every=2",
        "train.num_samples=2", "train.ema_decay=0.5", "logging.wandb_mode=disabled", "logging.progress=false",
        *([] if plan.dry_run else ["model.bf16_params=true"])])
    trainer = Trainer(config)
    start = {n: p.detach().float().clone() for n, p in trainer.generator.named_parameters()}
    result = trainer.fit()
    ema_moved = max((s - start[n]).abs().max().item() for n, s in trainer.ema.shadow.items())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last = rows[-1]
    record = read_distillation_record(os.path.join(out, "generator"))
    samples_dir = os.path.join(workdir, "trainer_samples")
    sample_code = cli_main(["sample", "--pipeline", pipeline, "--generator", os.path.join(out, "generator"),
                            "--prompt", "a red cat", "--teacher-steps", "4", "--out", samples_dir,
                            # gif: imageio-ffmpeg (mp4), a 66 MB wheel, does not fit the device's 64 MiB carry
                            "--format", "gif"])
    timing = json.load(open(os.path.join(samples_dir, "sample_timing.json"))) if sample_code == 0 else {}
    checks = {
        "iterations": [r["iteration"] for r in rows] == [0, 1, 2],
        "finite_losses": all(math.isfinite(v) for r in rows for k, v in r.items() if k.endswith("/loss")),
        "throughput_keys": all(k in last for k in ("throughput/iteration_seconds", "throughput/tflops_per_gpu")),
        "mfu_where_the_peak_is_known": plan.dry_run or plan.device.type != "cuda"
        or ("throughput/mfu" in last and 0 < last["throughput/mfu"] < 1)
        or not _known_peak(),
        "samples_during_the_run": len(os.listdir(os.path.join(out, "samples", "iter_0000002"))) == 2,
        "samples_at_the_end": len(result.samples) == 2,
        "export_record": record is not None and record["generator_steps"] == config.distill.generator_steps,
        "ema_fp32_and_moving": all(s.dtype == torch.float32 for s in trainer.ema.shadow.values()) and ema_moved > 0,
        "sample_tool": sample_code == 0 and timing.get("dtype") == ("float32" if plan.dry_run else "bfloat16"),
    }
    return {"ok": all(checks.values()), "checks": checks, "dtype": dtype, "last_metrics": last,
            "sample_timing": {r["model"]: r["seconds_per_sample"] for r in timing.get("runs", [])}}


@contextlib.contextmanager
def _deterministic_kernels():
    """torch's deterministic algorithms (a kernel without one warns) and cuDNN's deterministic
    choice, for the offload comparison; the settings as they were afterwards."""
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[2], was[3]


def _offloaded_run(pipeline: str, out: str, offload: str | None) -> tuple[list, dict, dict, dict | None, dict | None,
                                                                         bool]:
    """Three iterations of a tiny fp32 CogVideoX ADM run, then a checkpoint (as a run saves one):
    the losses and gradient norms, every trained weight, and the checkpoint's train_state read back with torch DCP.
    With offload also the same checkpoint written in the background (``train.async_save``: device
    tensors staged on the host, the writer a fork) while a fourth iteration updates everything in
    place, read back the same way, and the offload host buffers' bytes (are they pinned?) against
    the memory plan's host terms (else None, None); and whether every trained parameter kept its autograd
    gradient accumulator (megatron DDP's hooks sit on it: a parameter whose data moved to another device
    loses it, and its gradients no longer reach main_grad). ``offload``: None, or the
    ``optim.<network>.offload`` setting of every network (the background save and host figures:
    ``optimizer_and_params`` only)."""
    import dataclasses

    from adm_megatron.config import load_config
    from adm_megatron.memory.run_plan import plan_run
    from adm_megatron.train.background_save import BackgroundSaves
    from adm_megatron.train.checkpoint import save_training_checkpoint, start_training_checkpoint
    from adm_megatron.train.checkpoint_files import read_part_tensors
    from adm_megatron.train.trainer import Trainer

    config = load_config(os.path.join(REPO, "examples", "cogvideox", "tiny_cpu.yaml"), [
        f"model.teacher={pipeline}", f"output_dir={out}", "model.dtype=fp32", "data.num_prompts=4",
        "train.max_iterations=4", "train.num_samples=0", "train.export=false", "logging.wandb_mode=disabled",
        "logging.progress=false", "model.attention_backend=math",  # deterministic, unlike the fused kernels
        *([f"optim.{n}.offload={offload}" for n in ("generator", "fake_score", "discriminator")]
          if offload else [])])
    trainer = Trainer(config)
    params = [p for net in trainer.trainable.values() for p in net.module.parameters()]
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]
    # each phase's loss and its networks' gradient norms: the norms say whether a phase's backward
    # already differs before any update does
    losses = [{k: v for k, v in trainer.train_iteration(i).items() if k.endswith(("/loss", "/grad_norm"))}
              for i in range(3)]
    path = save_training_checkpoint(trainer, 3)  # (its weights back on the device first)
    kept = all(p.view_as(p).grad_fn.next_functions[0][0] is a for p, a in zip(params, accumulators))
    weights = {f"{p}.{n}": w.detach().cpu().clone() for p, net in trainer.trainable.items()
               for n, w in net.module.named_parameters()}
    state = read_part_tensors(os.path.join(path, "train_state"), os.path.join(out, "train_state.pt"))
    background = host = None
    if offload == "optimizer_and_params":
        buffers = list(trainer.offload.mover.host.values())
        planned = plan_run(config, 1, card_gib=80.0, pinned_memory=True).host
        host = {"held": sum(t.numel() * t.element_size() for t in buffers),
                "planned": planned["offloaded optimizer states"] + planned["offloaded weights"],
                "pinned": all(t.is_pinned() for t in buffers)}
        trainer.config = dataclasses.replace(config, output_dir=out + "_background")
        saves = BackgroundSaves(config.parallel.timeout_s)
        saves.start(start_training_checkpoint(trainer, 3))
        trainer.train_iteration(3)
        background = read_part_tensors(os.path.join(saves.wait(), "train_state"),
                                       os.path.join(out, "background_state.pt"))
    return losses, weights, state, background, host, kept


def _settle_race(device: torch.device) -> dict:
    """A host buffer read on the CPU right after its copy was queued behind device work, then after
    ``settle``: what a checkpoint of offloaded optimizer states would have written without it."""
    from adm_megatron.train.offload import HostMover

    mover = HostMover(device)
    gpu = device.type == "cuda"
    a = torch.randn((4096, 4096) if gpu else (64, 64), device=device)
    tensor = torch.zeros((64 << 20) if gpu else 4096, device=device)  # 256 MiB on a GPU
    for _ in range(16):  # device work ahead of the value (tens of ms on a GPU)
        a = torch.tanh(a @ a)
    tensor.fill_(7.0)  # queued after the chain: the copy to the host can only start after it
    mover.to_host([tensor])
    before = float(tensor.data[-1])  # what the CPU reads at once
    mover.settle()
    settled = bool((tensor.data == 7.0).all())
    mover.to_device([tensor])
    back = bool((tensor == 7.0).all()) and tensor.device.type == device.type
    return {"read_before_settle": before, "stale_before_settle": before != 7.0, "settled_read_right": settled,
            "back_on_device_right": back}


def section_offload(plan: Plan, workdir: str) -> dict:
    """Offload's CUDA path, which no CPU run takes (pinned host buffers, copies on a side stream,
    megatron's grad-buffer release on CUDA): a tiny fp32 CogVideoX ADM run with every network's
    optimizer state and weights offloaded against the same run without it -- the losses, the
    weights and the checkpoint's optimizer state (written from the host buffers, after
    ``Offloader.settle``) must agree. The runs use deterministic kernels (torch's deterministic
    algorithms, the math SDPA backend), and the run without offload is made twice: its two copies'
    difference is the noise floor (the first two GPU runs differed by 2.5e-2 in the losses and O(1) in
    weights and moments: offloaded weights lost the gradient accumulator megatron DDP hooks, so their
    gradients never reached main_grad; fixed in session 31, hence ``grad_accumulators_kept``). Agreement: within 1e-4 relative, or within twice the noise floor where the
    kernels were not deterministic after all; a half-copied moment is off by O(1). And the race ``settle``
    closes, shown on one 256 MiB buffer (``stale_before_settle`` is expected true on a GPU). Also
    the offloaded run's checkpoint written in the background (``train.async_save``) while the next
    iteration runs: its optimizer state must equal the synchronous one's bit for bit. And the memory
    plan's host terms must be the pinned host buffers' bytes exactly."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(os.path.join(workdir, "offload_pipe"), seed=0)
    with _deterministic_kernels():
        ref_losses, ref_weights, ref_state, _, _, _ = _offloaded_run(
            pipeline, os.path.join(workdir, "offload_off"), None)
        again_losses, again_weights, again_state, _, _, _ = _offloaded_run(
            pipeline, os.path.join(workdir, "offload_off_again"), None)
        losses, weights, state, background, host, kept = _offloaded_run(
            pipeline, os.path.join(workdir, "offload_on"), "optimizer_and_params")
        # the optimizer state alone offloaded (no weights move): which of the two moves differs
        opt_losses, opt_weights, opt_state, _, _, _ = _offloaded_run(
            pipeline, os.path.join(workdir, "offload_optimizer"), "optimizer")

    def each(got: dict, want: dict) -> dict[str, float]:
        return {k: rel_max(got[k].float(), want[k].float()) for k in want if want[k].numel()}

    def worst(values) -> float:
        """The largest, NaN when any is (Python's ``max`` keeps a NaN only when it comes first)."""
        values = list(values)
        return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)

    def per_iteration(got: list, want: list) -> list[dict[str, float]]:
        return [{k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b} for a, b in zip(got, want)]

    def compare(got_losses: list, got_weights: dict, got_state: dict) -> dict[str, float]:
        """The largest relative differences of a run's losses, weights and train_state to the reference."""
        return {"losses": worst(v for it in per_iteration(got_losses, ref_losses)
                                for k, v in it.items() if k.endswith("/loss")),
                "weights": worst(each(got_weights, ref_weights).values()),
                "train_state": worst(each(got_state, ref_state).values())}

    def first_tensors(got: dict, want: dict, count: int = 8) -> dict[str, float]:
        """The ``count`` tensors that differ most, by name (which network, which moment)."""
        diffs = sorted(each(got, want).items(), key=lambda kv: (not math.isnan(kv[1]), -kv[1]))  # NaN first
        return {k: v for k, v in diffs[:count] if not v <= 0}

    # where the runs part: each iteration's relative loss and gradient-norm differences, phase by
    # phase, and the tensors
    diagnosis = {
        "per_iteration": per_iteration(losses, ref_losses),
        "worst_weights": first_tensors(weights, ref_weights),
        "worst_train_state": first_tensors(state, ref_state),
        "optimizer_only": {**compare(opt_losses, opt_weights, opt_state),
                           "per_iteration": per_iteration(opt_losses, ref_losses)},
    }

    diffs = compare(losses, weights, state)
    noise = compare(again_losses, again_weights, again_state)
    race = _settle_race(plan.device)
    checks = {
        "same_keys": weights.keys() == ref_weights.keys() and state.keys() == ref_state.keys(),
        "optimizer_state_in_checkpoint": any(".exp_avg." in k for k in state),
        # weights offloaded and back keep the node megatron DDP hooked (it was lost on a GPU, session 31)
        "grad_accumulators_kept": kept,
        "agree": all(diffs[k] <= max(1e-4, 2 * noise[k]) for k in diffs),
        "settled_read_right": race["settled_read_right"],
        "back_on_device_right": race["back_on_device_right"],
        # the same checkpoint written in the background while an iteration ran: the same bits
        "background_save_identical": background.keys() == state.keys()
        and all(torch.equal(background[k], state[k]) for k in state),
        # the memory plan's host terms are the pinned buffers' bytes
        "host_plan_exact": host["held"] == host["planned"],
        "host_buffers_pinned": host["pinned"] or plan.device.type != "cuda",
    }
    log(f"  offload vs none: max rel diff {', '.join(f'{k} {v:.2e}' for k, v in diffs.items())} (none vs none: "
        f"{', '.join(f'{k} {v:.2e}' for k, v in noise.items())}); "
        f"read before settle {race['read_before_settle']} (stale: {race['stale_before_settle']})")
    if not checks["agree"]:
        log(f"  where they part: {json.dumps(diagnosis)}")
    return {"ok": all(checks.values()), "checks": checks, "max_rel_diff": diffs, "noise_floor": noise,
            "bit_identical": all(d == 0 for d in diffs.values()), "race": race, "host": host,
            "diagnosis": diagnosis}


def _known_peak() -> bool:
    from adm_megatron.bench.report import device_name, peak_tflops

    return peak_tflops(device_name(torch.device("cuda")), "bf16", None) is not None


def print_summary(report: Report) -> None:
    data = report.data
    sec = data["sections"]
    lines = ["", "=" * 100, "GPU CHECK SUMMARY"]
    env = sec.get("env", {})
    gpu = env.get("gpu", {})
    lines.append(f"device: {gpu.get('name', 'cpu' + (' (dry run)' if env.get('dry_run') else ''))}  torch {env.get('torch')}  "
                 f"megatron-core {env.get('megatron_core')}  diffusers {env.get('diffusers')}  "
                 f"parallel {env.get('parallel', {}).get('backend')}")
    te = env.get("transformer_engine", {})
    lines.append(f"transformer engine: {'available' if te.get('available') else te.get('reason', '?')}")
    if "matmul_peak" in sec:
        m = sec["matmul_peak"]
        lines.append(f"matmul {m['n']}^3 {m['dtype']}: {m['tflops']:.1f} TFLOP/s "
                     f"(datasheet dense bf16: {gpu.get('datasheet_bf16_dense_tflops')})")
    if any(k.startswith("correctness.") for k in sec) or sec.get("te", {}).get("variants"):
        lines.append("")
        lines.append("correctness (||x - ref|| / ||ref||; ref = diffusers in the reference precision)")
        lines.append(f"{'variant':8s} {'tokens':>7s} {'compared':28s} {'out':>10s} {'d_latents':>10s} "
                     f"{'d_text':>10s}  ok")
    def rows(label, tokens, entry):
        for key, value in entry["compared"].items():
            lines.append(f"{label:8s} {tokens:>7} {key + ' (' + value['dtype'] + ')':28s} "
                         f"{value['out']['rel_l2']:10.2e} {value['d_latents']['rel_l2']:10.2e} "
                         f"{value['d_text']['rel_l2']:10.2e}  {entry['ok']}")

    for name, entry in sec.items():
        if name.startswith("correctness."):
            rows(name.split(".", 1)[1], entry["tokens"], entry)
    te_sec = sec.get("te")
    if te_sec:
        if te_sec.get("status") == "skipped":
            lines.append(f"te: skipped: {te_sec.get('reason')}")
        else:
            for variant, entry in te_sec.get("variants", {}).items():
                rows("te " + variant, "", entry)
    speed = sec.get("speed")
    if speed:
        fl = speed["flops"]
        lines.append("")
        lines.append(f"speed: {fl['layers']} blocks, hidden {fl['hidden']}, {fl['tokens']} tokens, batch "
                     f"{speed['batch']}, {speed['dtype']}; fwd+bwd {fl['forward_backward_flops'] / 1e12:.1f} "
                     f"TFLOP (attention {fl['attention_share'] * 100:.0f}%); default SDPA: "
                     f"{speed['default_sdpa_backend']}")
        lines.append(f"{'impl':20s} {'sdpa':9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak GiB':>9s} "
                     f"{'TFLOP/s':>8s} {'MFU':>6s} {'MFU(mm)':>8s}")
        for row in speed["runs"]:
            fb = row["forward_backward"]
            mfu = fb.get("mfu_datasheet")
            mfu_mm = fb.get("mfu_measured_matmul")
            lines.append(f"{row['impl']:20s} {row['sdpa']:9s} {row['forward']['median_ms']:9.2f} "
                         f"{fb['median_ms']:11.2f} {_fmt(fb.get('peak_gib'), '9.2f'):>9s} "
                         f"{fb['tflops']:8.1f} {_fmt(mfu and mfu * 100, '5.1f'):>5s}% "
                         f"{_fmt(mfu_mm and mfu_mm * 100, '6.1f'):>7s}%")
        ratios = speed.get("diffusers_over_ours_forward_backward", {})
        if ratios:
            lines.append("diffusers / ours fwd+bwd time: " + ", ".join(
                f"{k} {v:.2f}x" for k, v in ratios.items()))
        for key, err in speed.get("errors", {}).items():
            lines.append(f"  {key}: {err.splitlines()[0][:110]}")
    sdpa = sec.get("sdpa")
    if sdpa:
        lines.append("")
        lines.append(f"attention alone {sdpa['shape_bhsd']} {sdpa['dtype']}")
        for row in sdpa["runs"]:
            lines.append(f"  {row['sdpa']:9s} {row['layout']:5s} fwd {row['forward_ms']:8.2f} ms "
                         f"({row['forward_tflops']:6.1f} TFLOP/s)  fwd+bwd {row['forward_backward_ms']:8.2f} "
                         f"ms ({row['forward_backward_tflops']:6.1f})  {','.join(row['ops'])}")
        for key, err in sdpa.get("errors", {}).items():
            lines.append(f"  {key}: {err.splitlines()[0][:110]}")
    decode = sec.get("decode_memory")
    if decode:
        lines.append("samples' VAE decode, measured / counted: " + ", ".join(
            f"{k} {r['measured_bytes'] / 2**30:.2f} / {r['counted_bytes'] / 2**30:.2f} GiB"
            for k, r in decode["rows"].items()))
    trainer = sec.get("trainer")
    if trainer:
        failed = [k for k, v in trainer["checks"].items() if not v]
        mfu = trainer["last_metrics"].get("throughput/mfu")
        lines.append("")
        lines.append(f"trainer ({trainer['dtype']}): {'ok' if trainer['ok'] else 'FAILED ' + ', '.join(failed)}; "
                     f"last iteration {trainer['last_metrics']['throughput/iteration_seconds']:.3f} s, "
                     f"mfu {'n/a' if mfu is None else f'{mfu:.4f}'}; sample s / sample: {trainer['sample_timing']}")
    offload = sec.get("offload")
    if offload:
        failed = [k for k, v in offload["checks"].items() if not v]
        lines.append(f"offload vs none: {'ok' if offload['ok'] else 'FAILED ' + ', '.join(failed)}; max rel diff "
                     + ", ".join(f"{k} {v:.1e}" for k, v in offload["max_rel_diff"].items())
                     + " (none vs none: " + ", ".join(f"{k} {v:.1e}" for k, v in offload["noise_floor"].items())
                     + f"); host buffer read before settle stale: {offload['race']['stale_before_settle']}")
    if data["errors"]:
        lines.append("")
        for name, err in data["errors"].items():
            lines.append(f"ERROR {name}: {err.splitlines()[0][:200]}")
    for name, reason in data["skipped"].items():
        lines.append(f"SKIPPED {name}: {reason}")
    lines.append(f"status: {data.get('status')}  elapsed {data.get('elapsed_s')} s  json: {report.path}")
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, fp32, host timers")
    parser.add_argument("--cpu", action="store_true",
                        help="real-width models on the CPU (a pre-flight of the GPU code path; use a "
                             "small --latent such as 1,8,8)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="time budget: sections that would start past it are skipped")
    parser.add_argument("--sections", default="env,matmul_peak,correctness,te,speed,sdpa,trainer,decode_memory,offload",
                        help="comma list of sections to run")
    parser.add_argument("--variants", default="", help="correctness variants, e.g. 2b,5b (default all)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="precision under test (default bf16 on a GPU, fp32 in a dry run)")
    parser.add_argument("--correct-layers", type=int, default=2, help="blocks in the correctness models")
    parser.add_argument("--speed-layers", type=int, default=4, help="blocks in the timed 2b slice")
    parser.add_argument("--latent", default="13,60,90", help="latent frames,height,width (GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where the random diffusers models are saved")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
    budget = Budget(args.budget_s)
    report = Report(out_path, budget)
    report.data["argv"] = sys.argv[1:] if argv is None else list(argv)
    sections = set(args.sections.split(","))
    if plan_on_cpu := (args.dry_run or args.cpu):
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    plan = make_plan(args)
    try:  # diffusers' notes on dtype casts and accelerate are noise here
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except Exception:
        pass
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    try:
        info = initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234, timeout_s=120)
    except Exception as exc:  # e.g. NCCL refusing in a sandbox: a world of one works on gloo too
        report.data["errors"]["parallel_init"] = f"{type(exc).__name__}: {exc}"
        log(f"initialize_parallel failed ({exc}); retrying with gloo")
        destroy_parallel()
        info = initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234, backend="gloo")
    log(f"parallel: {info.layout} backend={info.backend} device={info.device}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    own_workdir = args.workdir is None
    state = CorrectnessState(plan, workdir)
    heavy = 0.0 if plan_on_cpu else 1.0  # the rough seconds each section needs, on a GPU
    try:
        if "env" in sections:
            report.run("env", lambda: section_env(plan, info))
        if "matmul_peak" in sections:
            report.run("matmul_peak", lambda: section_matmul_peak(plan), need_s=5 * heavy)
        if "correctness" in sections:
            for variant in plan.variants:
                report.run(f"correctness.{variant}", lambda v=variant: section_correctness(state, v),
                           need_s=40 * heavy)
        if "te" in sections:
            report.run("te", lambda: section_te(state), need_s=40 * heavy)
        if "speed" in sections:
            env = report.data["sections"].get("env", {})
            datasheet = env.get("gpu", {}).get("datasheet_bf16_dense_tflops")
            matmul = report.data["sections"].get("matmul_peak", {}).get("tflops")
            report.run("speed", lambda: section_speed(plan, budget, datasheet, matmul if not plan.dry_run
                                                      else None), need_s=45 * heavy)
        if "sdpa" in sections:
            report.run("sdpa", lambda: section_sdpa(plan, budget), need_s=15 * heavy)
        if "trainer" in sections:
            report.run("trainer", lambda: section_trainer(plan, workdir), need_s=40 * heavy)
        if "decode_memory" in sections:
            report.run("decode_memory", lambda: section_decode_memory(plan, workdir), need_s=20 * heavy)
        if "offload" in sections:
            report.run("offload", lambda: section_offload(plan, workdir), need_s=30 * heavy)
    finally:
        failed = [k for k, v in report.data["sections"].items()
                  if isinstance(v, dict) and v.get("ok") is False]
        te_sec = report.data["sections"].get("te", {})
        failed += [f"te.{k}" for k, v in te_sec.get("variants", {}).items() if not v.get("ok")]
        report.data["failed_checks"] = failed
        report.data["status"] = "ok" if not failed and not report.data["errors"] else "problems"
        report.save()
        print_summary(report)
        try:
            destroy_parallel()
        except Exception as exc:
            log(f"destroy_parallel: {exc}")
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.data["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
