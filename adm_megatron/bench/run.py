"""``adm-megatron bench``: one run measuring (a) our DiT's forward and forward + backward, (b) the
same through diffusers with the same weights, dtype and inputs, alternating with (a), and (c) the
distillation iteration through the real trainer, phase by phase, and how long its checkpoint stops
training (:mod:`adm_megatron.bench.checkpoint_pause`); medians of ``repeats`` timings after
``warmup`` rounds. Model FLOPs are analytic (:mod:`adm_megatron.bench.flops`); MFU divides
by the card's peak (:mod:`adm_megatron.bench.report`). Returns the result as a dict (the JSON)."""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch

from adm_megatron.bench.adm_iteration import (measure_iterations, synthetic_prompts, trainer_overrides,
                                              write_scheduler_pipeline)
from adm_megatron.bench.dit import LatentShape, build_pair
from adm_megatron.bench.kernel_profile import format_comparison, profile_call
from adm_megatron.bench.report import environment, format_table, peak_tflops
from adm_megatron.bench.timing import alternating
from adm_megatron.config import FP8_TE_RECIPES, METHOD_KEYS, Config, ModelConfig, load_config
from adm_megatron.families import family_for_preset, family_of_model_dir, preset_names
from adm_megatron.hub_cache import local_dir, not_found_hint
from adm_megatron.models.attention_backend import auto_choices, forget_auto_choices
from adm_megatron.models.kernel_options import check_kernel_options
from adm_megatron.models.specs import spec_kind
from adm_megatron.train.teacher import resolve_teacher
from adm_megatron.train.validate import validate_run

logger = logging.getLogger("adm_megatron")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class BenchOptions:
    model: str  # a preset name or a diffusers transformer / pipeline directory
    layers: int | None = None  # presets only: fewer blocks, to fit one card
    batch: int = 1
    frames: int | None = None  # latent frames / height / width; default: the model's own size
    height: int | None = None
    width: int | None = None
    dtype: str = "auto"  # fp32 | bf16 | fp64 | auto (bf16 on a GPU, fp32 on CPU)
    impl: str = "auto"
    repeats: int = 7
    warmup: int = 2
    checkpoint_repeats: int = 2  # timed checkpoints of each kind; 0 measures none
    profile: bool = False  # one more DiT forward+backward of each side, and iteration, under torch.profiler
    peak_tflops: float | None = None
    seed: int = 0
    config: str | None = None  # a run config for the trainer (its model/data keys are replaced)
    overrides: list[str] = field(default_factory=list)
    command: str = ""  # the command line, recorded in the result


def resolve_model(opts: BenchOptions, workdir: str) -> tuple[str, str]:
    """(transformer directory, pipeline directory) for ``opts.model``; a preset is written with
    random weights (``opts.seed``) into ``workdir``."""
    if opts.model in preset_names():
        family, preset = family_for_preset(opts.model)
        family.require("bench", "adm-megatron bench")
        config = {k: v for k, v in preset.items() if k != "_class_name"}
        if opts.layers is not None:
            config["num_layers"] = opts.layers
            if config.get("dual_attention_layers"):  # SD3.5-Medium: keep the block indices that remain
                config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < opts.layers]
        torch.manual_seed(opts.seed)
        transformer = os.path.join(workdir, "transformer")
        family.diffusers_model_class()(**config).save_pretrained(transformer)
        return transformer, write_scheduler_pipeline(os.path.join(workdir, "pipeline"), family)
    if opts.layers is not None:
        raise ValueError(f"--layers={opts.layers}: applies to presets ({', '.join(preset_names('bench'))}) only")
    model = local_dir(opts.model, "--model")  # a repo id: its snapshot in the local hub cache
    if os.path.isfile(os.path.join(model, "model_index.json")):
        return os.path.join(model, "transformer"), model
    if os.path.isfile(os.path.join(model, "config.json")):
        family = family_of_model_dir(model).require("bench", "adm-megatron bench")
        return model, write_scheduler_pipeline(os.path.join(workdir, "pipeline"), family)
    raise ValueError(f"--model={opts.model!r}: expected a preset ({', '.join(preset_names('bench'))}) or a diffusers "
                     f"transformer or pipeline directory{not_found_hint(opts.model)}")


def _rate_row(name: str, median_s: float, flops: float, peak: float | None, **extra) -> dict:
    tflops = flops / median_s / 1e12
    return {"name": name, "median_s": median_s, "flops": flops, "tflops_per_s": tflops,
            "mfu": None if peak is None else tflops / peak, **extra}


def _dit_section(transformer: str, family, arch, shape: LatentShape, opts: BenchOptions, model: ModelConfig,
                 device, peak: float | None) -> tuple[dict, list[dict]]:
    reference = family.diffusers_model_class().from_pretrained(transformer)
    pair = build_pair(reference, arch, shape, DTYPES[opts.dtype], device, model, seed=opts.seed)
    difference = pair.max_relative_difference()
    timings = alternating({f"{who}/{what}": getattr(pair, what)(who) for what in ("forward", "forward_backward")
                           for who in ("ours", "reference")}, device, opts.repeats, opts.warmup)
    call = family.call_flops(arch, tuple(pair.inputs[0].shape), _text_tokens(family, arch))
    flops = {"forward": call.total(False, False), "forward_backward": call.total(False, True)}
    rows, section = [], {"max_relative_difference": difference, "ours_impl": model.impl}
    for key, timing in timings.items():
        who, what = key.split("/")
        label = "megatron (ours)" if who == "ours" else "diffusers"
        rows.append(_rate_row(f"DiT {what} {label}", timing["median_s"], flops[what], peak,
                              peak_memory_bytes=timing["peak_memory_bytes"], seconds=timing["seconds"]))
        section.setdefault("ours" if who == "ours" else "diffusers", {})[what] = rows[-1]
    section["ratio_ours_over_diffusers"] = {
        what: section["ours"][what]["median_s"] / section["diffusers"][what]["median_s"] for what in flops}
    if opts.profile:  # after the timed rounds: both sides warm (and ours compiled, where it is)
        section["profile_forward_backward"] = {
            side: profile_call(pair.forward_backward(who), device)
            for side, who in (("ours", "ours"), ("diffusers", "reference"))}
    del pair
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return section, rows


def _text_tokens(family, arch) -> int:
    return family.conditioning(arch).text_length


def _evaluations_text(evals: dict) -> str:
    return ", ".join(f"{role} {v['calls']:g}x{v['samples'] / max(v['calls'], 1):g}" for role, v in evals.items())


def check_options(opts: BenchOptions) -> None:
    """One-line ValueError for a flag out of range (before anything is built)."""
    least = {"--layers": (opts.layers, 1), "--batch": (opts.batch, 1), "--frames": (opts.frames, 1),
             "--height": (opts.height, 1), "--width": (opts.width, 1), "--repeats": (opts.repeats, 1),
             "--warmup": (opts.warmup, 0), "--checkpoint-repeats": (opts.checkpoint_repeats, 0)}
    for flag, (value, minimum) in least.items():
        if value is not None and value < minimum:
            raise ValueError(f"{flag}={value}: expected >= {minimum}")
    if opts.peak_tflops is not None and not 0 < opts.peak_tflops < math.inf:  # inf gave an MFU of 0.0%
        finite = "" if opts.peak_tflops <= 0 else " and finite"
        raise ValueError(f"--peak-tflops={opts.peak_tflops}: expected > 0{finite}")
    if not 0 <= opts.seed <= 2**63 - 1:  # as train's seed: torch seeds with 64 bits, and offsets are added to it
        raise ValueError(f"--seed={opts.seed}: expected an integer in [0, 2**63 - 1]")
    if opts.dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype={opts.dtype!r}: expected auto or one of {', '.join(DTYPES)}")


# the run keys the bench sets from its own flags
OWN_FLAGS = {"data.batch_size": "--batch", "data.frames": "--frames", "data.height": "--height",
             "data.width": "--width", "model.dtype": "--dtype", "model.impl": "--impl", "model.teacher": "--model",
             "model.pipeline": "--model"}


def _refuse_own_keys(own: list[str], overrides: list[str]) -> None:
    """A user override of a key the bench sets (one of ``own``), refused in one line: it would reach
    the iteration section only, unlike the DiT section and the JSON."""
    set_here = {item.partition("=")[0] for item in own}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in set_here:
            flag = OWN_FLAGS.get(key)
            raise ValueError(f"{item}: the bench sets {key} itself" + (f"; use {flag}" if flag else ""))


def run_overrides(opts: BenchOptions, teacher: str, pipeline: str, output_dir: str, shape: LatentShape) -> list[str]:
    """The trainer's overrides: the bench's own keys (its model, latent shape, dtype and block spec,
    and synthetic prompts unless the run's method reads teacher ODE pairs), then the user's."""
    own = [*trainer_overrides(teacher, pipeline, output_dir, shape, opts.dtype), f"model.impl={opts.impl}"]
    _refuse_own_keys(own, opts.overrides)
    prompts = synthetic_prompts(shape.batch)
    # the run's method (read with the bench's prompts last: the config's own need not be usable)
    method = load_config(opts.config, [*own, *opts.overrides, *prompts]).distill.method
    if method not in METHOD_KEYS["data.real_path"]:  # reads no ODE pairs (dmd2 and adp do)
        _refuse_own_keys(prompts, opts.overrides)
        own += prompts
    return [*own, *opts.overrides]


def check_run_keys(opts: BenchOptions) -> None:
    """The run config and its key=value overrides, refused in one line before a preset's random
    weights are written (minutes at real size): the keys the bench sets from the model (its
    directories and latent shape) are stand-ins here, replaced once the model is written."""
    shape = LatentShape(opts.batch, opts.frames or 1, opts.height or 1, opts.width or 1)
    pending = "(written by the bench)"
    load_config(opts.config, run_overrides(opts, pending, pending, pending, shape))


def run_bench(opts: BenchOptions) -> dict:
    from adm_megatron.parallel import initialize_parallel

    check_options(opts)
    if opts.dtype == "auto":  # the device initialize_parallel takes: a GPU where CUDA is available
        opts.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    check_run_keys(opts)
    device = initialize_parallel(1, 1, seed=opts.seed).device
    env = environment(device, opts.command)
    peak = peak_tflops(env["device"], opts.dtype, opts.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="adm-bench-") as workdir:
        transformer, pipeline = resolve_model(opts, workdir)
        family = family_of_model_dir(transformer).require("bench", "adm-megatron bench")
        arch = family.arch_from_pretrained_dir(transformer)
        real = LatentShape.native(arch, opts.batch)
        shape = LatentShape(opts.batch, *(real_size if size is None else size for size, real_size in (
            (opts.frames, real.frames), (opts.height, real.height), (opts.width, real.width))))
        overrides = run_overrides(opts, transformer, pipeline, os.path.join(workdir, "run"), shape)
        config = load_config(opts.config, overrides)  # the DiT section builds ours with its model keys too
        check_kernel_options(config.model, arch.attention_head_dim)
        # the trainer's own checks (distill.head_every against the blocks, ...) before the DiT section
        # runs, not after it (minutes at real size)
        validate_run(config, resolve_teacher(config.model.teacher, config.model.pipeline), 1)
        forget_auto_choices()  # the JSON records this run's
        dit, rows = _dit_section(transformer, family, arch, shape, opts, config.model, device, peak)
        # logged now as well: a bench stopped in the trainer section (a time limit) keeps these figures
        logger.info("DiT section (time ours / diffusers: forward %.3f, forward+backward %.3f):\n%s",
                    dit["ratio_ours_over_diffusers"]["forward"],
                    dit["ratio_ours_over_diffusers"]["forward_backward"], format_table(rows))
        if opts.profile:
            logger.info("DiT forward+backward by kernel kind (%s):\n%s",
                        dit["profile_forward_backward"]["ours"]["events"],
                        format_comparison(dit["profile_forward_backward"]))
        adm = measure_iterations(opts.config, overrides, opts.repeats, opts.warmup, opts.checkpoint_repeats,
                                 profile=opts.profile)
    for phase, row in adm["phases"].items():
        row["mfu"] = None if peak is None else row["tflops_per_s"] / peak
        rows.append({"name": f"{adm['method']} {phase}", **row,
                     "evaluations": _evaluations_text(adm["evaluations_per_iteration"].get(phase, {}))})
    ckpt = adm["checkpoint"]
    if ckpt is not None:
        rows += [{"name": "checkpoint: synchronous save", "median_s": ckpt["median_synchronous_s"],
                  "note": f"checkpoint of {ckpt['bytes'] / 2**30:.3g} GiB"},
                 {"name": "checkpoint: background pause", "median_s": ckpt["median_background_pause_s"],
                  "note": f"training waits this; the write then takes {ckpt['median_background_write_s']:.3g} s"}]
    p = arch.patch_size
    return {
        "environment": env,
        "model": {"source": opts.model, "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
                  "heads": arch.num_attention_heads,
                  "family": family.name, "latent_tokens": shape.frames * (shape.height // p) * (shape.width // p),
                  "text_tokens": _text_tokens(family, arch)},
        "shape": vars(shape), "dtype": opts.dtype, "repeats": opts.repeats, "warmup": opts.warmup,
        "peak_tflops": peak, "kernels": kernel_settings(config), "dit": dit, "adm": adm,
        "table": format_table(rows),
    }


def kernel_settings(config: Config) -> dict:
    """What the run's speed settings were: the block spec, its compilation, the attention backend
    (with what ``auto`` chose per call shape, and each candidate's time), FP8 and the DP gradient
    overlap."""
    m, p = config.model, config.parallel
    return {
        "spec": spec_kind(m.impl), "compile": m.compile,
        "attention_backend": m.attention_backend, "attention_auto_choices": auto_choices(),
        "fp8": m.fp8, "fp8_recipe": None if m.fp8 not in FP8_TE_RECIPES else {  # torchao's recipes have no options
            "margin": m.fp8_margin, "amax_history_len": m.fp8_amax_history_len,
            "amax_compute_algo": m.fp8_amax_compute_algo},
        "overlap_grad_reduce": p.overlap_grad_reduce, "grad_bucket_size": p.grad_bucket_size or None,
    }
