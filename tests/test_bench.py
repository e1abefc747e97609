"""``adm-megatron bench``: the analytic FLOPs against torch's own count, and a CPU smoke run of the
whole benchmark (our DiT and diffusers both run and agree; the trainer's phases are timed and their
network evaluations counted as Algorithm 1 prescribes; the JSON carries what docs/PERFORMANCE.md
quotes); a LoRA generator counted as what it computes (no base weight gradients, its adapters'
own work) and recorded in the JSON."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adm_megatron.bench.flops import cogvideox_call_flops, sd3_call_flops
from adm_megatron.data.tiny_pipeline import ROPE_OVERRIDES, TRANSFORMER, build_tiny_pipeline
from adm_megatron.models import CogVideoXArch
from adm_megatron.models.rotary import cogvideox_rotary_emb


def _counted(model, inputs, backward: bool) -> int:
    x, text, t, extra = inputs  # extra: CogVideoX's rotary embedding, or SD3's pooled text embedding
    kwargs = {"pooled_projections": extra} if isinstance(extra, torch.Tensor) else {"image_rotary_emb": extra}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math: attention as bmm
        out = model(hidden_states=x, encoder_hidden_states=text, timestep=t, **kwargs).sample
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [{}, ROPE_OVERRIDES], ids=["2b", "5b"])
def test_analytic_flops_equal_torch_flop_counter_on_diffusers_model(overrides):
    from diffusers import CogVideoXTransformer3DModel

    config = {**TRANSFORMER, **overrides}
    model = CogVideoXTransformer3DModel(**config)
    arch = CogVideoXArch.from_diffusers_config(config)
    batch, frames, height, width = 2, 3, 4, 6
    x = torch.randn(batch, frames, arch.in_channels, height, width)
    inputs = (x, torch.randn(batch, 16, arch.text_embed_dim), torch.tensor([3, 500]),
              cogvideox_rotary_emb(arch, frames, height, width))
    call = cogvideox_call_flops(arch, tuple(x.shape), 16)
    _check_forward_and_backward(model, inputs, call, x)


def _check_forward_and_backward(model, inputs, call, x, slack: float = 0.02):
    assert _counted(model, inputs, backward=False) == call.linear + call.attention
    # backward: the formula also counts input gradients of the input layers (patch / text / time
    # embeddings), which torch skips because the inputs need none: a fraction of a percent here
    trained = _counted(model, inputs, backward=True)
    assert 0 < call.total(grad_to_input=False, trainable=True) - trained < slack * trained
    model.requires_grad_(False)
    x.requires_grad_(True)
    frozen = _counted(model, inputs, backward=True)
    assert 0 < call.total(grad_to_input=True, trainable=False) - frozen < slack * frozen


@pytest.mark.parametrize("variant", ["sd3", "sd35", "sd35m"])
def test_sd3_analytic_flops_equal_torch_flop_counter_on_diffusers_model(variant):
    """SD3-Medium, SD3.5-Large (QK RMSNorm) and SD3.5-Medium (dual attention) styles; the last
    block's text stream is context_pre_only in all."""
    from diffusers import SD3Transformer2DModel

    from adm_megatron.models.sd3_config import SD3Arch
    from tiny_sd3 import TEXT_TOKENS, VARIANTS

    model = SD3Transformer2DModel(**VARIANTS[variant])
    arch = SD3Arch.from_diffusers_config(dict(VARIANTS[variant]))
    x = torch.randn(2, arch.in_channels, 8, 12)
    inputs = (x, torch.randn(2, TEXT_TOKENS, arch.joint_attention_dim), torch.tensor([3.0, 500.0]),
              torch.randn(2, arch.pooled_projection_dim))
    # backward slack 5%: the time (256 channels) and pooled embedders are large beside these tiny
    # blocks, and their input gradients, counted by the formula, are skipped by torch
    _check_forward_and_backward(model, inputs, sd3_call_flops(arch, tuple(x.shape), TEXT_TOKENS), x, slack=0.05)


def _count_forwards(monkeypatch, cls) -> list:
    calls = []
    original = cls.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return calls


def test_bench_cli_runs_both_models_and_every_phase(tmp_path, world_of_one, capsys, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.cli import main
    from adm_megatron.models import CogVideoXTransformer

    ours_calls = _count_forwards(monkeypatch, CogVideoXTransformer)
    diffusers_calls = _count_forwards(monkeypatch, CogVideoXTransformer3DModel)
    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", pipeline, "--repeats", "2", "--warmup", "0", "--frames", "2", "--height", "4",
                 "--width", "4", "--batch", "2", "--peak-tflops", "1", "--out", str(out),
                 "--profile", "distill.generator_steps=1", "distill.head_every=1", "distill.head_hidden=16",
                 "model.attention_backend=auto"]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device"].startswith("CPU") and env["date_utc"]
    assert env["command"].startswith("adm-megatron bench --model ") and env["command"].endswith("attention_backend=auto")
    assert set(env["versions"]) == {"adm-megatron", "torch", "megatron-core", "transformer-engine", "torchao", "diffusers",
                                    "transformers"}
    assert env["versions"]["torch"] == torch.__version__
    assert result["dtype"] == "fp32" and result["model"]["latent_tokens"] == 2 * 2 * 2

    kernels = result["kernels"]  # the speed settings both sections ran with
    assert kernels["spec"] == "local" and kernels["attention_backend"] == "auto" and kernels["fp8"] is None
    assert kernels["overlap_grad_reduce"] is False and kernels["grad_bucket_size"] is None
    assert kernels["compile"] == "none"
    chosen = {c["backend"] for c in kernels["attention_auto_choices"]}
    assert chosen and chosen <= {"flash", "math"}  # the CPU's kernels, timed per call shape
    dit = result["dit"]
    assert dit["max_relative_difference"] < 1e-5  # both sides ran the same model on the same inputs
    for side in ("ours", "diffusers"):
        for what in ("forward", "forward_backward"):
            row = dit[side][what]
            assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
            assert row["mfu"] == pytest.approx(row["tflops_per_s"])  # --peak-tflops 1
    ratio = dit["ratio_ours_over_diffusers"]["forward_backward"]
    assert ratio == pytest.approx(dit["ours"]["forward_backward"]["median_s"]
                                  / dit["diffusers"]["forward_backward"]["median_s"])

    adm = result["adm"]
    assert set(adm["phases"]) == {"fake_score", "generator", "discriminator", "iteration"}
    for row in adm["phases"].values():
        assert len(row["seconds"]) == 2 and row["median_s"] > 0 and row["tflops_per_s"] > 0
        assert row["peak_memory_bytes"] is None  # not measured on CPU
    iteration = adm["phases"]["iteration"]
    assert sum(adm["phases"][p]["flops"][0] for p in ("fake_score", "generator", "discriminator")) \
        == pytest.approx(iteration["flops"][0])
    one, cfg = {"calls": 1, "samples": 2}, {"calls": 1, "samples": 4}  # batch 2; CFG: one call of 2x
    assert adm["evaluations_per_iteration"] == {
        "fake_score": {"generator": one, "fake_score": one},
        "generator": {"generator": one, "fake_score": one, "teacher": cfg, "teacher.features": one},
        "discriminator": {"teacher.features": one},  # x_real only: x_fake's features are reused
    }
    ckpt = adm["checkpoint"]  # how long a checkpoint stops training, both ways, timed twice each
    for key in ("synchronous_s", "background_pause_s", "background_write_s"):
        assert len(ckpt[key]) == 2 and all(s > 0 for s in ckpt[key]) and ckpt[f"median_{key}"] > 0
    assert ckpt["bytes"] > 100_000  # whole checkpoints: weights and Adam moments of this tiny run
    # every forward really ran: diffusers once for the agreement check and 2 x 2 timed; ours as
    # often, plus each counted evaluation of the 2 timed iterations
    evaluations = sum(v["calls"] for roles in adm["evaluations_per_iteration"].values() for v in roles.values())
    assert len(diffusers_calls) == 6 and len(ours_calls) == 6 + 3 * evaluations  # + 1 profiled call / iteration
    for side, profile in dit["profile_forward_backward"].items():  # where each side's time went
        spent = profile["categories_ms"]
        assert profile["events"] == "aten operators, self CPU time"
        assert spent["attention"] > 0 and spent["gemm"] > 0 and spent["normalization"] > 0, (side, spent)
        assert profile["total_ms"] == pytest.approx(sum(spent.values())) and profile["total_ms"] <= profile["wall_ms"]
        assert profile["top"] and all(row["ms"] > 0 for row in profile["top"])
    it = adm["profile_iteration"]  # one more iteration, profiled: its events against its wall time
    assert it["categories_ms"]["gemm"] > 0 and it["categories_ms"]["attention"] > 0
    assert 0 < it["total_ms"] <= it["wall_ms"] and it["total_ms"] == pytest.approx(sum(it["categories_ms"].values()))
    captured = capsys.readouterr()
    printed = captured.out
    assert "note: --warmup 0 times each side's first, cold round too" in captured.err
    assert "DiT forward_backward diffusers" in printed and "adm discriminator" in printed
    assert "time ours / diffusers" in printed and "DiT forward+backward by kernel kind" in printed
    assert "adm iteration by kernel kind: its events " in printed
    assert "checkpoint: synchronous save" in printed and "checkpoint: background pause" in printed
    assert f"attention auto ({', '.join(sorted(chosen))})" in printed and "fp8 off, DP grad overlap off" in printed
    calls = len(ours_calls)
    capsys.readouterr()
    assert main(["bench", "--model", pipeline, "--out", str(out)]) == 2  # an earlier measurement is kept
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron bench: --out {out}: exists (an earlier measurement; pass --overwrite to replace it)")
    assert len(ours_calls) == calls and json.loads(out.read_text()) == result  # refused before measuring


def test_bench_refuses_an_out_it_could_not_write_before_measuring(tmp_path, world_of_one, capsys, monkeypatch):
    """The JSON written at the end of minutes of measuring: a folder that is not there was a
    traceback then, the measurement lost."""
    import adm_megatron.bench.run as bench_run
    from adm_megatron.cli import main

    written = []
    monkeypatch.setattr(bench_run, "resolve_model", lambda *a: written.append(a))
    out = tmp_path / "nowhere" / "bench.json"
    assert main(["bench", "--model", "cogvideox-2b", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron bench: --out {out}: the folder {out.parent} does not exist")
    assert written == []


def test_bench_refuses_what_the_trainer_would_before_the_dit_section(tmp_path, world_of_one, capsys, monkeypatch):
    """distill.head_every beyond the model's blocks was refused by the trainer section, after the DiT
    section had run (minutes at real size) and with no JSON written."""
    from adm_megatron.cli import main
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.models.cogvideox import CogVideoXTransformer

    ours_calls = _count_forwards(monkeypatch, CogVideoXTransformer)
    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)  # 2 blocks; head_every defaults to 3
    capsys.readouterr()
    assert main(["bench", "--model", pipeline, "--repeats", "1", "--warmup", "1", "--frames", "2", "--height", "4",
                 "--width", "4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "adm-megatron bench: distill.head_every=3: the teacher has only 2 blocks")
    assert ours_calls == []


def test_bench_refuses_layers_for_a_directory(tmp_path, world_of_one, capsys):
    from adm_megatron.cli import main

    assert main(["bench", "--model", str(tmp_path), "--layers", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "adm-megatron bench: --layers=2: applies to presets "
        "(cogvideox-2b, cogvideox-5b, sd3-medium, sd3.5-large, sd3.5-medium) only")


def test_bench_refuses_a_bad_run_key_before_writing_a_preset(tmp_path, world_of_one, capsys, monkeypatch):
    """A preset's random weights take minutes to write at real size (CogVideoX-2b: 86 s here), so
    the run keys are checked first: a bad key costs one line, and no model is written."""
    import adm_megatron.bench.run as bench_run
    from adm_megatron.cli import main

    written = []
    monkeypatch.setattr(bench_run, "resolve_model", lambda *a: written.append(a))
    assert main(["bench", "--model", "cogvideox-2b", "model.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adm-megatron bench: command line: unknown key 'model.bogus'") and "\n" not in err
    assert written == []


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=4", "data.batch_size=4: the bench sets data.batch_size itself; use --batch"),
    ("model.dtype=fp64", "model.dtype=fp64: the bench sets model.dtype itself; use --dtype"),
    ("train.export=true", "train.export=true: the bench sets train.export itself"),
    # an ADM run's prompts are synthetic: no prompt embeddings to provide
    ("data.source=shards", "data.source=shards: the bench sets data.source itself"),
])
def test_bench_refuses_keys_it_sets_from_its_flags(override, expected, world_of_one, capsys, monkeypatch):
    """Such an override reached the iteration section alone: its rows ran at another batch, size or
    dtype than the DiT section, the header and the JSON said."""
    import adm_megatron.bench.run as bench_run
    from adm_megatron.cli import main

    written = []
    monkeypatch.setattr(bench_run, "resolve_model", lambda *a: written.append(a))
    assert main(["bench", "--model", "cogvideox-2b", override]) == 2
    assert capsys.readouterr().err.strip() == f"adm-megatron bench: {expected}"
    assert written == []


@pytest.mark.parametrize("flag,value,expected", [
    ("--layers", "0", "--layers=0: expected >= 1"),  # was a ZeroDivisionError traceback
    ("--frames", "0", "--frames=0: expected >= 1"),  # 0 used to mean the model's size: 13 x 60 x 90 on a CPU
    ("--height", "-2", "--height=-2: expected >= 1"),
    ("--repeats", "0", "--repeats=0: expected >= 1"),  # was "no median for empty data", after measuring
    ("--warmup", "-1", "--warmup=-1: expected >= 0"),
    ("--checkpoint-repeats", "-1", "--checkpoint-repeats=-1: expected >= 0"),
    ("--peak-tflops", "0", "--peak-tflops=0.0: expected > 0"),
])
def test_bench_refuses_out_of_range_flags_in_one_line(flag, value, expected, world_of_one, capsys, monkeypatch):
    import adm_megatron.bench.run as bench_run
    from adm_megatron.cli import main

    written = []
    monkeypatch.setattr(bench_run, "resolve_model", lambda *a: written.append(a))
    assert main(["bench", "--model", "cogvideox-2b", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"adm-megatron bench: {expected}"
    assert written == []


def test_bench_runs_an_sd3_pipeline(sd3_pipeline, tmp_path, world_of_one, monkeypatch):
    """The same benchmark on an image family: SD3's diffusers transformer beside ours (pooled text
    embedding, 333 text tokens), the trainer's phases on images, FLOPs from SD3's formula."""
    from diffusers import SD3Transformer2DModel

    from adm_megatron.cli import main
    from adm_megatron.families import get_family
    from adm_megatron.models.sd3_config import SD3Arch

    diffusers_calls = _count_forwards(monkeypatch, SD3Transformer2DModel)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", sd3_pipeline, "--repeats", "1", "--warmup", "0", "--height", "8",
                 "--width", "8", "--batch", "2", "--out", str(out),
                 "distill.generator_steps=1", "distill.head_every=1", "distill.head_hidden=16"]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["family"] == "sd3" and result["shape"]["frames"] == 1
    assert result["model"]["latent_tokens"] == 16 and result["model"]["text_tokens"] == 77 + 256
    assert result["dit"]["max_relative_difference"] < 1e-5 and len(diffusers_calls) == 3
    arch = SD3Arch.from_pretrained_dir(f"{sd3_pipeline}/transformer")
    forward = get_family("sd3").call_flops(arch, (2, arch.in_channels, 8, 8), 77 + 256)
    assert result["dit"]["ours"]["forward"]["flops"] == forward.linear + forward.attention
    evaluations = result["adm"]["evaluations_per_iteration"]
    assert evaluations["generator"]["teacher"] == {"calls": 1, "samples": 4}  # CFG batched
    assert evaluations["discriminator"] == {"teacher.features": {"calls": 1, "samples": 2}}
    assert all(row["median_s"] > 0 and row["tflops_per_s"] > 0 for row in result["adm"]["phases"].values())


def test_bench_times_adp_on_teacher_ode_pairs_of_the_runs_own_prompts(cogvideox_pipeline, tmp_path, world_of_one):
    """The bench set synthetic prompts for every method, so the trainer refused ADP's (and DMD2's)
    pairs collected on the run's prompt embeddings ("manifest prompts.source='shards', the run's
    data.source='synthetic'"), and data.source=shards was refused as a key the bench sets: a method
    that reads pairs keeps the run's prompts."""
    from adm_megatron.cli import main
    from adm_megatron.data.text_embeddings import write_embedding_shards
    from adm_megatron.data.tiny_pipeline import MAX_TEXT_LENGTH
    from adm_megatron.parallel import destroy_parallel

    prompts = write_embedding_shards(str(tmp_path / "prompts"), [f"prompt {i}" for i in range(3)],
                                     torch.randn(3, MAX_TEXT_LENGTH, TRANSFORMER["text_embed_dim"]),
                                     torch.zeros(MAX_TEXT_LENGTH, TRANSFORMER["text_embed_dim"]), shard_size=2)
    run = ["data.source=shards", f"data.path={prompts}", "distill.head_every=1", "distill.head_hidden=16"]
    pairs = str(tmp_path / "pairs")
    try:
        assert main(["collect-ode", "--out", pairs, "--num-pairs", "4", "--steps", "1", "--no-progress",
                     f"model.teacher={cogvideox_pipeline}", "data.frames=2", "data.height=4", "data.width=4",
                     *run]) == 0
    finally:
        destroy_parallel()
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", cogvideox_pipeline, "--repeats", "1", "--warmup", "0", "--checkpoint-repeats",
                 "0", "--frames", "2", "--height", "4", "--width", "4", "--batch", "2", "--out", str(out), *run,
                 "distill.method=adp", f"data.real_path={pairs}", "distill.pixel_weight=0"]) == 0
    adp = json.loads(out.read_text())["adm"]
    assert adp["method"] == "adp" and set(adp["phases"]) == {"generator", "discriminator", "iteration"}


def test_training_reports_its_throughput_with_the_benchmarks_flop_count(tmp_path, world_of_one):
    """Every iteration's metrics carry its wall time, samples per second and model TFLOP/s per GPU:
    the FLOPs of every network call the iteration made (counted again here by a second counter
    wrapped around the trainer's networks), over the iteration's seconds; no MFU without a known
    card's BF16 peak (a CPU run)."""
    import time

    from adm_megatron.bench.counting import EvalCounter, instrument
    from adm_megatron.config import load_config
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    trainer = Trainer(load_config(None, [
        f"model.teacher={pipeline_dir}", f"output_dir={tmp_path / 'run'}", "data.batch_size=1",
        "data.global_batch_size=2", "data.frames=2", "data.height=4", "data.width=4", "distill.head_every=1",
        "distill.generator_steps=2", "logging.wandb_mode=disabled", "logging.progress=false"]))
    outside = EvalCounter()
    instrument(trainer.networks, outside, trainer.arch)
    for iteration in range(2):  # the trainer's count starts afresh each iteration
        outside.reset()
        start = time.perf_counter()
        metrics = trainer.train_iteration(iteration)
        wall = time.perf_counter() - start
        seconds = metrics["throughput/iteration_seconds"]
        phases = sum(metrics[f"{p}/seconds"] for p in ("fake_score", "generator", "discriminator"))
        assert phases <= seconds <= wall
        flops = sum(t.flops for t in outside.tallies.values())
        assert flops > 0 and outside.per_phase()["outside phases"]["generator"]["calls"] > 0
        assert metrics["throughput/tflops_per_gpu"] * seconds * 1e12 == pytest.approx(flops, rel=1e-12)
        assert metrics["throughput/samples_per_second"] == pytest.approx(2 / seconds)
        assert "throughput/mfu" not in metrics


# -- LoRA generators: base frozen, adapters trained ------------------------------------------------
# the test's own count of the adapters' forward FLOPs, 2 rows r (in + out) per adapted linear, from
# the arch and the targets below (CogVideoX: the joint sequence; SD3: image or text tokens by stream)
COGVIDEOX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff_context.net.2"]


def _cogvideox_adapter_flops(arch, rank, batch, frames, height, width, text, blocks=None):
    d, p = arch.hidden_size, arch.patch_size
    rows = text + frames * (height // p) * (width // p)  # text and video tokens through every block linear
    per_block = 2 * rows * rank * ((d + 3 * d) + (d + d) + (d + 4 * d))  # fused QKV, to_out.0, ff.net.0.proj
    return batch * (arch.num_layers if blocks is None else blocks) * per_block


def _sd3_adapter_flops(arch, rank, batch, height, width, text, blocks=None):
    d, p = arch.hidden_size, arch.patch_size
    image = (height // p) * (width // p)
    total = 0
    for block in range(arch.num_layers if blocks is None else blocks):
        attentions = 2 if block in arch.dual_attention_layers else 1  # attn2.to_q ... match the names too
        total += attentions * 2 * image * rank * ((d + 3 * d) + (d + d))  # image QKV, to_out.0
        total += 2 * text * rank * (d + 3 * d)  # add_q/k/v_proj: the text tokens
        if block < arch.num_layers - 1:  # the last block's text stream ends at its QKV (context_pre_only)
            total += 2 * text * rank * ((d + d) + (4 * d + d))  # to_add_out, ff_context.net.2
    return batch * total


class _Uncalled:
    """A DiTFunction stand-in: the counter reads its module; the call itself is not made."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x_t, t, cond):
        return None

    def features(self, x_t, t, cond, every):
        return None


@pytest.mark.parametrize("family_name", ["cogvideox", "sd3"])
def test_lora_generator_counts_its_adapters_and_no_base_weight_gradients(family_name, world_of_one):
    """A LoRA generator's call: base linears forward + input gradients only (2x), attention 3x, the
    adapters 3x (trainable) / 2x (frozen, gradient to the input) / 1x (no_grad); a features-only call
    counts the adapters of the blocks it runs only. SD3.5-Medium-style (dual attention) with
    context-stream targets; 3 blocks so that a features call stops before the last."""
    from adm_megatron.bench.counting import CountingDiT, EvalCounter
    from adm_megatron.config import LoraConfig
    from adm_megatron.families import get_family
    from adm_megatron.lora import apply_lora
    from adm_megatron.models.taps import feature_depth
    from tiny_sd3 import VARIANTS

    family = get_family(family_name)
    batch, text, (frames, height, width) = 2, 7, ((3, 4, 6) if family_name == "cogvideox" else (1, 8, 12))
    config, targets = (({**TRANSFORMER, "num_layers": 3}, COGVIDEOX_LORA_TARGETS) if family_name == "cogvideox"
                       else (dict(VARIANTS["sd35m"]), SD3_LORA_TARGETS))
    arch = family.arch_from_diffusers_config(config, "test")
    shape = (batch, *family.latent_shape(arch, frames, height, width))

    def adapters(arch, rank, blocks=None):
        if family_name == "cogvideox":
            return _cogvideox_adapter_flops(arch, rank, batch, frames, height, width, text, blocks)
        return _sd3_adapter_flops(arch, rank, batch, height, width, text, blocks)

    x, t, cond = torch.zeros(shape), torch.zeros(batch), torch.zeros(batch, text, 8)
    base = family.call_flops(arch, shape, text)
    every = 2  # taps block 1 of 3: the features call runs blocks 0 and 1
    depth = feature_depth(arch.num_layers, every)
    assert depth < arch.num_layers
    head = family.call_flops(arch, shape, text, depth, False)

    def counted(lora=None, frozen_adapters=False):
        model = family.build_model(arch, device="meta")
        if lora is not None:
            apply_lora(model, lora, seed=0)
            if frozen_adapters:
                model.lora.requires_grad_(False)
        counter = EvalCounter()
        net = CountingDiT(_Uncalled(model), "generator", counter, arch)
        counter.phase = "grad"
        net(x.requires_grad_(frozen_adapters), t, cond)
        x.requires_grad_(False)
        with torch.no_grad():
            counter.phase = "no_grad"
            net(x, t, cond)
            counter.phase = "features"
            net.features(x, t, cond, every)
        return {phase: counter.phase_flops(phase) for phase in ("grad", "no_grad", "features")}

    full = counted()
    assert full["grad"] == 3 * base.linear + 3 * base.attention  # a full fine-tune: weight gradients too
    lora = {rank: counted(LoraConfig(rank=rank, alpha=8.0, target_modules=targets)) for rank in (4, 8)}
    for rank, flops in lora.items():
        assert adapters(arch, rank) > 0
        assert flops["grad"] == 2 * base.linear + 3 * base.attention + 3 * adapters(arch, rank)
        assert flops["no_grad"] == base.linear + base.attention + adapters(arch, rank)
        assert flops["features"] == head.linear + head.attention + adapters(arch, rank, depth)
        assert adapters(arch, rank, depth) < adapters(arch, rank)
        assert flops["grad"] < full["grad"]
    # the adapter term is linear in the rank: rank 8 counts rank 4's adapters once more
    assert lora[8]["grad"] - lora[4]["grad"] == 3 * adapters(arch, 4)
    frozen = counted(LoraConfig(rank=4, alpha=8.0, target_modules=targets), frozen_adapters=True)
    assert frozen["grad"] == 2 * base.linear + 3 * base.attention + 2 * adapters(arch, 4)  # input gradients only


def test_bench_counts_a_lora_generator_and_records_its_settings(sd3_pipeline, tmp_path, world_of_one):
    """The trainer's count (the bench's phases and the logged TFLOP/s) of a LoRA run against a full
    fine-tune's, on SD3 with context-stream targets: the generator phase loses the base weight
    gradients of the generator's call and gains its adapters 3x, the fake score phase (the generator
    under no_grad) gains them 1x, the discriminator phase is unchanged; the result records the LoRA
    settings (None for a full fine-tune)."""
    from adm_megatron.bench.adm_iteration import measure_iterations, synthetic_prompts, trainer_overrides
    from adm_megatron.bench.dit import LatentShape
    from adm_megatron.models.sd3_config import SD3Arch

    shape, text = LatentShape(2, 1, 8, 8), 77 + 256  # synthetic SD3 prompts: 333 tokens
    lora = "model.lora={rank: 4, alpha: 8, target_modules: [%s]}" % ", ".join(SD3_LORA_TARGETS)
    result = {}
    for name, extra in (("full", []), ("lora", [lora])):
        overrides = [*trainer_overrides(f"{sd3_pipeline}/transformer", sd3_pipeline, str(tmp_path / name), shape,
                                        "fp32"), *synthetic_prompts(shape.batch)]
        result[name] = measure_iterations(None, [*overrides, "distill.generator_steps=1", "distill.head_every=1",
                                                 "distill.head_hidden=16", *extra], repeats=1, warmup=0)
    arch = SD3Arch.from_pretrained_dir(f"{sd3_pipeline}/transformer")
    generator = sd3_call_flops(arch, (2, arch.in_channels, 8, 8), text)
    adapters = _sd3_adapter_flops(arch, 4, 2, 8, 8, text)
    full, ours = ({phase: row["flops"][0] for phase, row in result[name]["phases"].items()} for name in ("full", "lora"))
    assert result["full"]["evaluations_per_iteration"] == result["lora"]["evaluations_per_iteration"]
    assert ours["generator"] - full["generator"] == pytest.approx(3 * adapters - generator.linear, rel=1e-12)
    assert ours["generator"] < full["generator"]
    assert ours["fake_score"] - full["fake_score"] == pytest.approx(adapters, rel=1e-12)
    assert ours["discriminator"] == full["discriminator"]

    d, last = arch.hidden_size, arch.num_layers - 1
    widths = last * ((d + 3 * d) + (d + d) + (d + 3 * d) + (d + d) + (4 * d + d)) + (d + 3 * d) + (d + d) + (d + 3 * d)
    assert result["full"]["lora"] is None
    assert result["lora"]["lora"] == {"rank": 4, "alpha": 8.0, "target_modules": SD3_LORA_TARGETS,
                                      "adapted_layers": 5 * last + 3, "trainable_parameters": 4 * widths}


@pytest.mark.parametrize("family_name", ["cogvideox", "sd3"])
def test_adapter_flops_equal_torch_flop_counter_on_our_lora_model(family_name, world_of_one):
    """The family's adapter formula against torch's count of what the adapters add to our model's
    forward (the rows each adapted linear really sees), whole and features-only (2 of 3 blocks)."""
    from adm_megatron.bench.counting import adapted_linears, lora_of
    from adm_megatron.config import LoraConfig
    from adm_megatron.families import get_family
    from adm_megatron.lora import apply_lora
    from tiny_sd3 import VARIANTS

    family = get_family(family_name)
    if family_name == "cogvideox":
        arch = family.arch_from_diffusers_config({**TRANSFORMER, "num_layers": 3}, "test")
        shape, text_len, targets = (2, 3, arch.in_channels, 4, 6), arch.max_text_seq_length, COGVIDEOX_LORA_TARGETS
        kwargs = {"image_rotary_emb": family.positional_inputs(arch, 3, 4, 6)}
        text = torch.randn(2, text_len, arch.text_embed_dim)
    else:
        arch = family.arch_from_diffusers_config(dict(VARIANTS["sd35m"]), "test")
        shape, text_len, targets = (2, arch.in_channels, 8, 12), 7, SD3_LORA_TARGETS
        kwargs = {"pooled_projections": torch.randn(2, arch.pooled_projection_dim)}
        text = torch.randn(2, text_len, arch.joint_attention_dim)
    model = family.build_model(arch, device="cpu")
    x, t = torch.randn(shape), torch.tensor([3.0, 500.0])

    def counted(**features) -> int:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(hidden_states=x, encoder_hidden_states=text, timestep=t, **kwargs, **features)
        return counter.get_total_flops()

    features = {"return_features": True, "feature_every": 2}  # taps block 1: runs blocks 0 and 1
    base, base_features = counted(), counted(**features)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=targets), seed=0)
    layers = adapted_linears(lora_of(model))
    assert counted() - base == family.lora_flops(arch, shape, text_len, layers) > 0
    assert counted(**features) - base_features == family.lora_flops(arch, shape, text_len, layers, 2) > 0


@pytest.mark.parametrize("name, expected", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
     "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("triton_red_fused_native_layer_norm_native_layer_norm_backward_0", "normalization"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "normalization"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<c10::BFloat16, unsigned int, 4, 64, 64>", "copy"),
    ("triton_poi_fused_add_mul_silu_3", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::addmm", "gemm"),
    ("aten::convolution_backward", "convolution"),
])
def test_profile_sorts_kernel_names_into_kinds(name, expected):
    """The kinds ``bench --profile`` sums a side's time into, from kernel names as a GPU trace shows
    them (cuDNN / flash attention, cuBLAS GEMMs, cuDNN convolutions, Triton fusions) and CPU operators."""
    from adm_megatron.bench.kernel_profile import category

    assert category(name) == expected
