"""The memory planner against measurement: for each tiny ADM config that runs here (CogVideoX 2b- and
5b-style, SD3 and SD3.5-style; ADP with its latent discriminator, and with its pixel branch too, on
CogVideoX and SD3), every phase's
planned peak (and resident memory) is within 15% of
the peak tensor memory measured over a real trainer iteration with torch.profiler's memory profile
(``adm_megatron/memory/measure.py``). Also: exact parameter counts on ``meta``, the ``plan``
command's table / JSON / exit status (CogVideoX and SD3 presets), and the one-line refusals of bad
layouts before any model is built."""

from __future__ import annotations

import json
import re
import os

import pytest
import torch

from adm_megatron.cli import main
from adm_megatron.config import load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD3_LORA_EXAMPLE = os.path.join(ROOT, "examples", "sd35", "sd3_medium_4step_lora.yaml")
SD35_LARGE_EXAMPLE = os.path.join(ROOT, "examples", "sd35", "sd35_large_4step.yaml")

TOLERANCE = 0.15
BASE = [
    "data.num_prompts=4", "data.batch_size=2", "distill.generator_steps=2", "distill.delta_t=100",
    "distill.head_every=1", "distill.head_hidden=16", "train.max_iterations=2", "train.num_samples=0",
    "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false",
]
# (rotary 5b-style teacher, overrides): small latents (weights dominate), larger latents
# (activations dominate), the same with full recompute, the 5b-style teacher, and accumulation
TINY_RUNS = {
    "2b-2x4x4": (False, ["data.frames=2", "data.height=4", "data.width=4"]),
    "2b-3x16x16": (False, ["data.frames=3", "data.height=16", "data.width=16"]),
    "2b-3x16x16-recompute": (False, ["data.frames=3", "data.height=16", "data.width=16", "model.recompute=true"]),
    "5b-3x16x16": (True, ["data.frames=3", "data.height=16", "data.width=16"]),
    # 4 micro-batches of 1 accumulated: the inputs of all four, and the generator phase's pairs
    # (x_fake's features, two latents) of each, kept for the discriminator phase
    "2b-3x16x16-accumulate4": (False, ["data.frames=3", "data.height=16", "data.width=16", "data.batch_size=1",
                                       "data.global_batch_size=4"]),
    # micro-batch 1, as every real-size example: on a CPU the heads' first conv then unfolds its input
    # (im2col, 27 x the tapped feature) in the generator phase's frozen heads, and the attention
    # backward's per-thread buffers (2 MiB on two threads from 768 tokens) outweigh the activations;
    # both were missing (the generator phase planned 0.84 of its measured peak at 3x48x48)
    "2b-3x32x32-batch1": (False, ["data.frames=3", "data.height=32", "data.width=32", "data.batch_size=1"]),
    # plain DMD: no discriminator heads and no discriminator phase (the plan had both, as ADM's)
    "2b-3x16x16-dmd": (False, ["data.frames=3", "data.height=16", "data.width=16", "distill.method=dmd"]),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {rope: build_tiny_pipeline(str(root / f"rope{rope}"), seed=0, rope=rope) for rope in (False, True)}


def plan_and_measure(teacher: str, output_dir: str, overrides: list[str], world_size: int = 1) -> dict:
    """{phase: (planned resident, measured resident, planned peak, measured peak)} on this rank."""
    from adm_megatron.memory.measure import measure_phases
    from adm_megatron.memory.run_plan import plan_run
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={teacher}", f"output_dir={output_dir}", *BASE, *overrides])
    measured = measure_phases(lambda: Trainer(config))  # first: the trainer sets up the layout's world
    plan = plan_run(config, world_size, device="cpu", card_gib=1.0, cpu_threads=torch.get_num_threads())
    assert set(measured) == set(plan.phases)
    return {phase: (plan.phases[phase].resident, m.resident_bytes, plan.phases[phase].peak, m.peak_bytes)
            for phase, m in measured.items()}


def assert_within_tolerance(figures: dict, context, resident: bool = True) -> None:
    """Each phase's planned peak within 15% of the measured one (the issue's bar), and its resident
    memory too where the measurement can see every free (``resident``, see the SP / CP test)."""
    for phase, (planned_resident, measured_resident, planned_peak, peak) in figures.items():
        report = (context, phase, figures[phase])
        assert abs(planned_peak / peak - 1) <= TOLERANCE, report
        if resident:
            assert abs(planned_resident / measured_resident - 1) <= TOLERANCE, report


@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_plan_is_within_15_percent_of_measured_peak_of_every_phase(name, pipelines, tmp_path, world_of_one):
    rope, overrides = TINY_RUNS[name]
    figures = plan_and_measure(pipelines[rope], str(tmp_path), overrides)
    assert set(figures) == ({"fake_score", "generator"} if "distill.method=dmd" in overrides else
                            {"fake_score", "generator", "discriminator"})
    assert_within_tolerance(figures, name)


def test_the_generator_ema_is_planned_as_measured(pipelines, tmp_path, world_of_one):
    """train.ema_decay > 0 keeps an fp32 copy of the generator's trained weights on the device: every
    phase's resident memory and peak grow by what the measurement sees grow (within 5%), and the plan
    with the EMA stays within the 15% bar."""
    small = TINY_RUNS["2b-2x4x4"][1]
    without = plan_and_measure(pipelines[False], str(tmp_path / "without"), small)
    with_ema = plan_and_measure(pipelines[False], str(tmp_path / "with"), [*small, "train.ema_decay=0.5"])
    assert_within_tolerance(with_ema, "ema")
    for phase in without:
        planned, measured = (with_ema[phase][i] - without[phase][i] for i in (0, 1))
        assert measured > 0 and abs(planned / measured - 1) <= 0.05, (phase, planned, measured)


def test_the_samples_are_planned_after_the_last_phase(pipelines, tmp_path, world_of_one):
    """train.num_samples > 0 adds a samples row: the resident state the measurement sees when the run
    samples (within 15%), then the VAE's weights and one sample's decode, counted on fake tensors.
    The count leaves out the convolutions' own workspaces, which on a CPU are large (an im2col buffer
    per 3D conv), so the measured peak is above the planned one here; the count is at least the
    decoded frames and their fp32 postprocess, and tiling lowers it. A run without samples has no row."""
    from adm_megatron.families import family_of_model_dir
    from adm_megatron.memory.measure import measure_phases
    from adm_megatron.memory.run_plan import plan_run
    from adm_megatron.train.trainer import Trainer

    def config_of(*overrides):
        return load_config(None, [f"model.teacher={pipelines[False]}", f"output_dir={tmp_path / 'run'}", *BASE,
                                  *TINY_RUNS["2b-3x16x16"][1], *overrides])

    def plan_of(config):
        return plan_run(config, 1, device="cpu", card_gib=1.0, cpu_threads=torch.get_num_threads())

    config = config_of("train.num_samples=2")
    measured = measure_phases(lambda: Trainer(config), samples=True)["samples"]
    samples = plan_of(config).samples
    assert abs(samples.resident / measured.resident_bytes - 1) <= TOLERANCE, (samples.resident, measured)
    vae_weights = samples.transients["VAE weights"]
    decode = samples.transients["decode and postprocess"]
    assert samples.peak_moment == "VAE decode" and samples.peak == samples.resident + vae_weights + decode
    assert samples.peak < measured.peak_bytes  # the CPU's conv workspaces on top
    frames = 9 * 3 * 64 * 64 * 4  # 3 latent frames of 16 x 16: 9 frames of 64 x 64 pixels, fp32
    vae = family_of_model_dir(f"{pipelines[False]}/transformer").load_vae(f"{pipelines[False]}/vae")
    assert decode >= 2 * frames and vae_weights == sum(p.numel() * 4 for p in vae.parameters())
    tiled = plan_of(config_of("train.num_samples=2", "train.sample_vae_tiling=true")).samples
    assert tiled.transients["decode and postprocess"] < decode / 2
    assert plan_of(config_of("train.num_samples=0")).samples is None


def _sd3_lora_targets() -> str:
    """The adapters of the real SD3-Medium LoRA example (both streams' attention and MLP linears)."""
    targets = load_config(SD3_LORA_EXAMPLE).model.lora.target_modules
    return f"model.lora={{rank: 4, alpha: 4, target_modules: [{', '.join(targets)}]}}"


# (SD3.5-style qk-norm teacher, overrides), images with 333 synthetic text tokens (77 CLIP + 256 T5):
# small latents (text and weights dominate), larger latents (image tokens weigh), the SD3.5-style
# teacher, a LoRA generator with the SD3-Medium example's adapters, and wide 2D heads (the
# discriminator phase peaks in their backward)
TINY_SD3_RUNS = {
    "sd3-8x8": (False, ["data.height=8", "data.width=8"]),
    "sd3-32x32": (False, ["data.height=32", "data.width=32"]),
    "sd35-qk-norm-32x32": (True, ["data.height=32", "data.width=32"]),
    "sd3-lora-32x32": (False, ["data.height=32", "data.width=32", _sd3_lora_targets()]),
    "sd3-wide-2d-heads-32x32": (False, ["data.height=32", "data.width=32", "distill.head_hidden=128",
                                        "distill.head_blocks=2"]),
}


@pytest.fixture(scope="module")
def sd3_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_teachers")
    return {qk: build_tiny_sd3_pipeline(str(root / f"qk{qk}"), seed=0, qk_norm=qk) for qk in (False, True)}


@pytest.mark.parametrize("name", sorted(TINY_SD3_RUNS))
def test_sd3_plan_is_within_15_percent_of_measured_peak_of_every_phase(name, sd3_pipelines, tmp_path, world_of_one):
    qk_norm, overrides = TINY_SD3_RUNS[name]
    figures = plan_and_measure(sd3_pipelines[qk_norm], str(tmp_path), ["data.frames=1", *overrides])
    assert_within_tolerance(figures, name)


# ADP with its latent discriminator (no fake score, no rollout, no CFG teacher; the pixel branch is
# refused, see test_bad_inputs.py), on teacher ODE pairs at the run's latent size: CogVideoX without
# and with full recompute, SD3
LATENT_ONLY = ["distill.pixel_weight=0"]
PIXEL = ["distill.pixel_layers=[2,4]"]  # the tiny encoder's (4 layers, 64-pixel images) is added below
TINY_ADP_RUNS = {
    "adp-2b-3x16x16": ("cogvideox", ["data.frames=3", "data.height=16", "data.width=16", *LATENT_ONLY]),
    "adp-2b-3x16x16-recompute": ("cogvideox", ["data.frames=3", "data.height=16", "data.width=16",
                                               "model.recompute=true", *LATENT_ONLY]),
    "adp-sd3-32x32": ("sd3", ["data.frames=1", "data.height=32", "data.width=32", *LATENT_ONLY]),
    # micro-batch 1 (see 2b-3x32x32-batch1): the generator phase planned 0.78 of its measured peak
    "adp-2b-3x32x32-batch1": ("cogvideox", ["data.frames=3", "data.height=32", "data.width=32", "data.batch_size=1",
                                            *LATENT_ONLY]),
    # with the pixel branch (9 decoded frames of 128 x 128 per video: it dominates the peaks)
    "adp-pixel-sam-2b-3x16x16": ("cogvideox", ["data.frames=3", "data.height=16", "data.width=16", *PIXEL]),
    "adp-pixel-sam-2b-3x16x16-recompute": ("cogvideox", ["data.frames=3", "data.height=16", "data.width=16", *PIXEL,
                                                         "distill.pixel_recompute=true"]),
    "adp-pixel-dinov2-sd3-32x32": ("sd3", ["data.frames=1", "data.height=32", "data.width=32", *PIXEL,
                                           "distill.pixel_encoder=dinov2"]),
}


@pytest.mark.parametrize("name", sorted(TINY_ADP_RUNS))
def test_adp_plan_is_within_15_percent_of_measured_peak_of_every_phase(name, pipelines, sd3_pipelines, tmp_path,
                                                                        world_of_one):
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder

    family, overrides = TINY_ADP_RUNS[name]
    teacher = pipelines[False] if family == "cogvideox" else sd3_pipelines[False]
    kind = "dinov2" if "distill.pixel_encoder=dinov2" in overrides else "sam"
    encoder = save_tiny_encoder(kind, str(tmp_path / kind), image_size=64)
    (tmp_path / "run.yaml").write_text(f"model: {{teacher: {teacher}}}\n")
    assert main(["collect-ode", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pairs"),
                 "--num-pairs", "4", "--steps", "2", "--no-progress", "data.num_prompts=4", *overrides[:3]]) == 0
    destroy_parallel()
    initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234)
    adp = ["distill.method=adp", "distill.generator_steps=1", f"data.real_path={tmp_path / 'pairs'}",
           f"distill.pixel_encoder_path={encoder}"]
    figures = plan_and_measure(teacher, str(tmp_path / "out"), [*adp, *overrides])
    assert set(figures) == {"generator", "discriminator"}
    assert_within_tolerance(figures, name)


def _rank_plan_and_measure(teacher: str, output_dir: str, overrides: list[str]) -> dict:
    return plan_and_measure(teacher, output_dir, overrides, world_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.tensor_parallel=2", "model.sequence_parallel=true"], ["parallel.context_parallel=2"]])
def test_plan_is_within_15_percent_on_each_rank_under_sequence_and_context_parallel(layout, pipelines, tmp_path):
    from multiproc import run_world

    overrides = ["data.frames=3", "data.height=16", "data.width=16", *layout]
    ranks = run_world(_rank_plan_and_measure, 2, pipelines[False], str(tmp_path), overrides, timeout_s=900)
    for rank, figures in enumerate(ranks):
        # resident memory too: the blocks gloo's worker threads free (the profiler sees no free on a
        # thread it does not profile) are counted free where the worker drops them (measure.py); when
        # they were counted live until their address was reused, the measured figures varied run to
        # run and rank to rank (0.79-0.98 of the plan) and this layout failed on loaded machines
        assert_within_tolerance(figures, (layout, rank))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.tensor_parallel=2", "model.sequence_parallel=true"], ["parallel.context_parallel=2"]])
def test_sd3_plan_is_within_15_percent_on_each_rank_under_sequence_and_context_parallel(layout, sd3_pipelines,
                                                                                         tmp_path):
    """SD3's text stream is whole on every TP rank (SP splits the image tokens only)."""
    from multiproc import run_world

    overrides = ["data.frames=1", "data.height=32", "data.width=32", *layout]
    ranks = run_world(_rank_plan_and_measure, 2, sd3_pipelines[False], str(tmp_path), overrides, timeout_s=900)
    for rank, figures in enumerate(ranks):
        assert_within_tolerance(figures, (layout, rank))


def test_measurement_counts_only_the_blocks_the_profile_saw_allocated():
    """A free of a block allocated before the profile (an earlier test's tensor collected now) is
    not the trainer's and is left out; a new allocation at a live address counts the old block free."""
    from adm_megatron.memory.measure import signed_sizes

    events = [(1, 100, 0xA), (2, -7, 0xB), (3, 50, 0xC), (4, 30, 0xA), (5, -50, 0xC), (6, -30, 0xA)]
    assert signed_sizes(events) == [(1, 100), (3, 50), (4, -100), (4, 30), (5, -50), (6, -30)]


def test_blocks_freed_on_another_thread_are_freed_where_a_collective_completes():
    """A block without a free event (gloo's worker dropped it) is counted free at the end of the
    first collective that completes after it was made -- when reused later, and when no live tensor
    holds its address at the end --; a block still held at the end stays live. (The TP + SP test
    above failed on loaded machines before: such blocks counted live until their address was reused.)"""
    from adm_megatron.memory.measure import signed_sizes

    events = [(1, 100, 0xA), (2, 40, 0xB), (3, 8, 0xC), (10, 30, 0xA), (11, -8, 0xC), (12, 5, 0xD)]
    collectives = [2, 5, 9]  # work completions
    assert signed_sizes(events, alive_at_end={0xA, 0xD}, collective_ends=collectives) == [
        (1, 100), (2, -100), (2, 40), (3, 8), (5, -40), (10, 30), (11, -8), (12, 5)]
    # without the collectives' times the reuse, and the end of the profile, are the bounds
    assert signed_sizes(events, alive_at_end={0xA, 0xD}) == [
        (1, 100), (2, 40), (3, 8), (10, -100), (10, 30), (11, -8), (12, -40), (12, 5)]
    # blocks made outside any op (a loader's storages) are freed at their address's reuse only
    assert signed_sizes(events, alive_at_end={0xA, 0xD}, collective_ends=collectives,
                        outside_ops={(1, 0xA), (2, 0xB)}) == [
        (1, 100), (2, 40), (3, 8), (10, -100), (10, 30), (11, -8), (12, 5)]


def test_a_tensor_freed_during_the_measurement_does_not_count(pipelines, tmp_path, world_of_one):
    """The same tiny run measured twice, once while a 64 MB tensor is freed in it that was made under
    an earlier profile (as an earlier measurement's leftovers are when the garbage collector takes
    them: the allocator remembers their size, so the profile gets their free without their
    allocation): every phase's figures agree within 1% (before the fix they went 64 MB lower, below
    zero on a tiny run)."""
    from torch.profiler import ProfilerActivity, profile

    from adm_megatron.memory.measure import measure_phases
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipelines[False]}", f"output_dir={tmp_path}", *BASE,
                                "data.frames=2", "data.height=4", "data.width=4"])
    plain = measure_phases(lambda: Trainer(config))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        earlier = [torch.zeros(16 * 1024 * 1024)]

    def build_while_freeing():
        earlier.clear()
        return Trainer(config)

    freeing = measure_phases(build_while_freeing)
    for phase, m in plain.items():
        assert abs(freeing[phase].resident_bytes / m.resident_bytes - 1) <= 0.01, (phase, m, freeing[phase])
        assert abs(freeing[phase].peak_bytes / m.peak_bytes - 1) <= 0.01, (phase, m, freeing[phase])


def test_meta_counts_equal_a_built_model_and_split_tensor_parallel_weights(world_of_one):
    from adm_megatron.memory.counts import backbone_size
    from adm_megatron.models import CogVideoXArch, build_model
    from adm_megatron.families.cogvideox_presets import PRESETS
    from tiny_cogvideox import TINY_2B

    arch = CogVideoXArch.from_diffusers_config(TINY_2B)
    model = build_model(arch)
    assert backbone_size(arch, 1).params == sum(p.numel() for p in model.parameters())
    real = CogVideoXArch.from_diffusers_config(PRESETS["cogvideox-2b"])
    one, two = backbone_size(real, 1), backbone_size(real, 2)
    assert one.params == 1_693_783_872  # CogVideoX-2b's published transformer size
    assert one.params / 2 < two.params < one.params  # QKV / proj / MLP split, norms and adaLN whole


def _plan(tmp_path, *args):
    config = tmp_path / "run.yaml"
    config.write_text("model: {teacher: /nowhere, dtype: bf16, sequence_parallel: true, recompute: true}\n"
                      "parallel: {tensor_parallel: 2}\n")
    return main(["plan", "--config", str(config), "--arch", "cogvideox-2b", *args])


def test_plan_command_prints_the_table_and_writes_json(tmp_path, capsys, world_of_one):
    out = tmp_path / "plan.json"
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--json", str(out)) == 0
    table = capsys.readouterr().out
    assert "generator phase" in table and "fits" in table
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["settings"]["data_parallel"] == 4
    assert set(plan["phases"]) == {"fake_score", "generator", "discriminator"}
    assert plan["networks"]["teacher"]["grads"] == 0 and plan["networks"]["generator"]["optimizer"] > 0
    host = plan["host"]  # no offload: the checkpoint staging alone, 8 ranks on a node
    assert host["offloaded optimizer states"] == 0 and host["checkpoint staging"] > 0
    assert host["ranks_per_node"] == 8 and host["per_node"] == pytest.approx(8 * host["checkpoint staging"], abs=0.01)
    assert host["fits"] is None and "host memory per rank: 0.00 GiB offloaded" in table
    capsys.readouterr()
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--json", str(tmp_path)) == 2  # a directory
    assert capsys.readouterr() == ("", f"adm-megatron plan: --json {tmp_path}: is a directory; give a file name\n")
    missing = tmp_path / "nowhere" / "plan.json"  # refused before the plan is printed, not after
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--json", str(missing)) == 2
    assert capsys.readouterr() == ("", f"adm-megatron plan: --json {missing}: the folder {missing.parent} does not "
                                       "exist\n")


def test_plan_command_checks_the_host_memory_of_a_node_when_given(tmp_path, capsys, world_of_one):
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--gpus-per-node", "4", "--host", "4096") == 0
    assert "4 ranks per node" in capsys.readouterr().out
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--host", "16") == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out.splitlines()[-1]
    assert captured.err.count("\n") == 1 and "host memory does not fit: 8 ranks x" in captured.err
    # nothing offloaded: the staging is the only host term, and sharding does not change it (the
    # advice was to shard the optimizer, or to offload less)
    staging = ("; the checkpoint staging (6.06 GiB a rank) shrinks only with fewer ranks on a node (--gpus-per-node) "
               "or more data-parallel ranks to split it\n")
    assert captured.err.endswith(f"per node{staging}") and "shard" not in captured.err
    assert _plan(tmp_path, "--gpus", "8", "--card", "80", "--host", "16", "--shard-optimizer", "all") == 1
    assert capsys.readouterr().err.endswith(f"per node{staging}")
    offloaded = ["--gpus", "8", "--card", "80", "--host", "16", "--assume-pinned-memory", "--offload", "optimizer"]
    assert _plan(tmp_path, *offloaded) == 1
    assert ("; offload less (optim.<network>.offload; now: discriminator, fake_score, generator) or shard their "
            "optimizer over data parallel (optim.<network>.shard_over_dp; not yet: discriminator, fake_score, "
            f"generator){staging}") in capsys.readouterr().err
    assert _plan(tmp_path, *offloaded, "--shard-optimizer", "all") == 1
    assert ("; offload less (optim.<network>.offload; now: discriminator, fake_score, generator); the checkpoint"
            in capsys.readouterr().err)


def test_a_plan_under_a_gib_is_printed_in_mib(pipelines, tmp_path, capsys, world_of_one):
    """A tiny model's table in GiB reads 0.00 throughout; in MiB it says what the run takes."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {{teacher: {pipelines[False]}}}\ndistill: {{head_every: 1}}\n")
    out = tmp_path / "tiny.json"
    assert main(["plan", "--config", str(config), "--gpus", "1", "--card", "80", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert " on 1 GPU of 80 GiB" in table and "(MiB per GPU)" in table and "1 rank per node" in table
    peak = re.search(r"^peak (\d+\.\d\d) MiB in the \w+ phase; card 80 GiB", table, re.M)
    assert peak and float(peak.group(1)) > 0.1, table
    plan = json.loads(out.read_text())  # the same figures in GiB, to the KiB (at 3 decimals they read 0.0)
    assert abs(plan["peak"] * 1024 - float(peak.group(1))) < 0.01, (plan["peak"], peak.group(1))


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2", "--card", "80", "--shard-optimizer", "all"], "data_parallel=1 leaves nothing to shard"),
    (["--gpus", "8", "--card", "80", "--offload", "optimizer"], "needs pinned host memory"),
    (["--gpus", "8", "--card", "80", "parallel.tensor_parallel=4"], "30 attention heads are not divisible"),
    # the family's own checks, as train makes them
    (["--gpus", "8", "--card", "80", "parallel.context_parallel=4"],
     "parallel.context_parallel=4: 17550 video tokens (data.frames x h/2 x w/2) are not divisible by it"),
    (["--gpus", "8", "--card", "80", "data.height=62"],
     "tokens per context-parallel rank (text 226 + video 18135) are not divisible by tensor_parallel=2"),
    (["--gpus", "3", "--card", "80"], "gpus=3: not a positive multiple"),
    (["--gpus", "8", "--card", "80", "--gpus-per-node", "0"], "gpus_per_node=0, host=0.0 GiB: expected"),
    # not finite: NaN was planned and said not to fit (exit 1), infinity to fit
    (["--gpus", "8", "--card", "nan"], "card=nan GiB, margin=0.1: expected a finite card > 0 and 0 <= margin < 1"),
    (["--gpus", "8", "--card", "inf"], "card=inf GiB, margin=0.1: expected a finite card > 0"),
    (["--gpus", "8", "--card", "80", "--host", "nan"], "host=nan GiB: expected at least one GPU per node and a finite"),
    (["--gpus", "8", "--card", "80", "--host", "inf"], "host=inf GiB: expected at least one GPU per node and a finite"),
    (["--gpus", "8", "--card", "80", "data.global_batch_size=6"],
     "gpus=8: data.global_batch_size=6: expected a multiple of data.batch_size x data-parallel size = 1 x 4 = 4"),
    (["--gpus", "8", "--card", "80", "--assume-pinned-memory", "--shard-optimizer", "all", "--offload",
      "optimizer_and_params"], "offload=optimizer_and_params with a sharded optimizer"),
    (["--gpus", "8", "--card", "80", "optim.generator.shard_over_dp=true", "optim.generator.offload=optimizer_and_params"],
     "optim.generator.offload=optimizer_and_params with shard_over_dp=true"),
    (["--gpus", "8", "--card", "80", "--params", "bf16", "model.dtype=fp32"],  # train refuses model.bf16_params so
     "--params bf16 needs model.dtype=bf16 (got fp32)"),
])
def test_bad_layouts_get_one_line_before_any_model_is_built(args, message, tmp_path, capsys, monkeypatch):
    # the same on every machine: pinned host memory is what CUDA gives, so the refusal is for no CUDA
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)

    def no_build(*_, **__):
        raise AssertionError("a model was built before the layout was checked")

    monkeypatch.setattr("adm_megatron.memory.run_plan.backbone_size", no_build)
    assert _plan(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_a_run_that_cannot_fit_says_so_in_one_line(tmp_path, capsys, world_of_one):
    assert _plan(tmp_path, "--gpus", "8", "--card", "24") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("adm-megatron plan: does not fit: peak") and "\n" not in err, err


def _config_plan(*overrides, gpus=8):
    from adm_megatron.memory.run_plan import plan_run

    config = load_config(None, ["model.teacher=/nowhere", "model.dtype=bf16", "model.sequence_parallel=true",
                                "model.recompute=full", *overrides])
    return plan_run(config, gpus, preset="cogvideox-2b", card_gib=80.0)


def test_accumulation_plans_every_micro_batchs_inputs_and_kept_pairs():
    """Global batch 16 on DP = 8 with micro-batches of 1: 2 micro-batches per update, both made up
    front (twice the inputs), the discriminator phase starts with both pairs (x_fake's features and
    two latents) and the generator phase keeps the first while the second runs; activations are
    those of one micro-batch."""
    one = _config_plan(gpus=8)
    two = _config_plan("data.global_batch_size=16", gpus=8)
    assert (one.settings.microbatches, two.settings.microbatches) == (1, 2)
    assert two.fixed["run inputs"] == 2 * one.fixed["run inputs"]
    more_inputs = sum(two.fixed.values()) - sum(one.fixed.values())
    pair = two.phases["discriminator"].resident - one.phases["discriminator"].resident - more_inputs
    # x_fake's ten taps (views of 226 + 17,550 tokens x 1920 in bf16) and two fp32 latents 13 x 16 x 60 x 90
    assert pair == 10 * 17776 * 1920 * 2 + 2 * 13 * 16 * 60 * 90 * 4
    generator = two.phases["generator"]
    kept = {"kept x_fake features": 10 * 17776 * 1920 * 2, "kept x_fake / x_real latents": 2 * 13 * 16 * 60 * 90 * 4}
    assert generator.peak_moment == "discriminator backward"
    assert {name: generator.transients[name] for name in kept} == kept  # each line what it counts
    assert generator.activations == one.phases["generator"].activations
    assert not set(kept) & set(one.phases["generator"].transients)


def test_each_networks_optimizer_step_clips_by_its_own_grad_clip():
    """The clipped copy of the grads (``P x 4``) is in a network's optimizer step when its own
    ``optim.<network>.grad_clip`` > 0: the fake score's step lost it only when every network's was 0."""
    base = _config_plan()
    assert base.phases["fake_score"].peak_moment == "optimizer step"
    others_off = _config_plan("optim.generator.grad_clip=0", "optim.discriminator.grad_clip=0")
    assert others_off.phases["fake_score"].peak == base.phases["fake_score"].peak
    own_off = _config_plan("optim.fake_score.grad_clip=0")
    assert own_off.settings.grad_clip == {"generator", "discriminator"}
    # its step without the copy is below its backward now, which sets the phase's peak
    step_without_copy = base.phases["fake_score"].peak - base.networks["fake_score"]["grads"]
    fake_score = own_off.phases["fake_score"]
    assert fake_score.peak_moment == "fake-score backward" and step_without_copy < fake_score.peak < base.phases[
        "fake_score"].peak


def test_the_plan_follows_the_run_configs_memory_settings():
    """The settings ``train`` implements, read from the config: sharding over DP = 8 divides each
    sharded network's optimizer term by 8; offload removes idle networks' optimizer state and grad
    buffers from every phase's resident memory (and from the peak); bf16 weights halve the weights, not
    the (fp32) grads;
    recompute is per network and phase."""
    base = _config_plan()
    shard = _config_plan(*(f"optim.{n}.shard_over_dp=true" for n in ("generator", "fake_score", "discriminator")))
    assert base.settings.data_parallel == 8
    for name in ("generator", "fake_score", "discriminator"):
        assert shard.networks[name]["optimizer"] * 8 == pytest.approx(base.networks[name]["optimizer"], rel=1e-12)
        assert shard.networks[name]["weights"] == base.networks[name]["weights"]
    assert shard.peak < base.peak
    offload = _config_plan(*(f"optim.{n}.offload=optimizer" for n in ("generator", "fake_score", "discriminator")))
    def idle(phase, part):
        return sum(base.networks[n][part] for n in ("generator", "fake_score", "discriminator") if n != phase)

    for phase, p in offload.phases.items():  # idle optimizer states on the host, idle grad buffers released
        assert p.resident == pytest.approx(
            base.phases[phase].resident - idle(phase, "optimizer") - idle(phase, "grads"), rel=1e-12), phase
    assert base.peak_phase == offload.peak_phase == "generator"
    assert offload.peak == pytest.approx(
        base.peak - idle("generator", "optimizer") - idle("generator", "grads"), rel=1e-12)
    one = _config_plan("optim.generator.offload=optimizer")  # per network: only the generator's state moves
    generator = base.networks["generator"]
    assert one.phases["fake_score"].resident == pytest.approx(
        base.phases["fake_score"].resident - generator["optimizer"] - generator["grads"], rel=1e-12)
    bf16 = _config_plan("model.bf16_params=true")
    assert base.networks["teacher"]["weights"] < 0.51 * _config_plan("model.dtype=fp32").networks["teacher"]["weights"]
    for name in ("generator", "fake_score"):  # bf16 weights; their grads accumulated and reduced in fp32
        assert bf16.networks[name]["weights"] < 0.51 * base.networks[name]["weights"]
        assert bf16.networks[name]["grads"] == base.networks[name]["grads"]
        assert _config_plan("model.bf16_params=true", "model.grad_reduce_in_fp32=false").networks[name]["grads"] * 2 \
            == base.networks[name]["grads"]
    g_only = _config_plan("model.recompute=none", "model.recompute.generator=full")
    none = _config_plan("model.recompute=none")
    assert g_only.phases["generator"].activations < none.phases["generator"].activations
    assert g_only.phases["fake_score"].activations == none.phases["fake_score"].activations


def test_a_lora_generator_plans_optimizer_state_and_grads_for_its_adapters_only():
    """``model.lora``: the generator's grads and AdamW state are its adapters' (rank r on each
    targeted linear of CogVideoX-2b: r (in + out) elements per linear, counted here by hand), its
    weights the base plus the adapters; the other networks are unchanged."""
    h, r, blocks = 1920, 64, 30  # CogVideoX-2b
    per_block = r * ((h + 3 * h) + (h + h) + (h + 4 * h) + (4 * h + h))  # fused QKV, to_out, ff.net.0 / 2
    adapters = blocks * per_block
    full = _config_plan()
    lora = _config_plan(f"model.lora={{rank: {r}, alpha: {r}}}")
    g, g_full = lora.networks["generator"], full.networks["generator"]
    assert g["grads"] == adapters * 4  # fp32 params: grads in fp32
    assert g["optimizer"] == adapters * 8  # two fp32 moments
    assert g["weights"] == g_full["weights"] + adapters * 4
    for name in ("teacher", "fake_score", "discriminator"):
        assert lora.networks[name] == full.networks[name], name
    assert lora.peak < full.peak - 0.9 * (g_full["grads"] + g_full["optimizer"])


@pytest.mark.parametrize("preset", ["sd3-medium", "sd3.5-large", "sd3.5-medium"])
def test_sd3_meta_counts_equal_the_diffusers_transformer(preset, world_of_one):
    """The planner's sizes of the SD3 presets (built on ``meta``, no weights) are diffusers'
    ``SD3Transformer2DModel`` of the same config, parameter for parameter."""
    from diffusers import SD3Transformer2DModel

    from adm_megatron.families import family_for_preset
    from adm_megatron.memory.counts import backbone_size

    family, config = family_for_preset(preset)
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**config)
    arch = family.arch_from_diffusers_config(config, preset)
    assert backbone_size(arch, 1).params == sum(p.numel() for p in reference.parameters())


def test_plan_command_plans_the_sd3_examples_on_meta_sizes(tmp_path, capsys, world_of_one):
    """``adm-megatron plan`` on the SD3.5-Large full fine-tune and SD3-Medium LoRA examples: their
    teachers (``/path/to/...``) do not exist, so the plan comes from the ``--arch`` preset built on
    ``meta``. SD3.5-Large (bf16 weights, optimizer states sharded over DP, TP = 2) fits 80 GiB cards
    on the 32 GPUs its launch line uses, not on 8; with fp32 weights and nothing sharded, not even on 32."""
    from adm_megatron.families import preset_names

    assert {"sd3-medium", "sd3.5-large", "sd3.5-medium", "cogvideox-2b"} <= set(preset_names("memory-plan"))
    large = ["plan", "--config", SD35_LARGE_EXAMPLE, "--arch", "sd3.5-large", "--card", "80"]
    assert main([*large, "--gpus", "8"]) == 1
    out = capsys.readouterr()
    assert "sd3.5-large on 8 GPUs" in out.out and "DOES NOT FIT" in out.out and "does not fit" in out.err
    out_json = tmp_path / "plan.json"
    assert main([*large, "--gpus", "32", "--json", str(out_json)]) == 0
    plan = json.loads(out_json.read_text())
    assert plan["fits"] and plan["settings"]["data_parallel"] == 16 and plan["settings"]["params"] == "bf16"
    assert plan["phases"]["generator"]["activations"] > 0
    assert main([*large, "--gpus", "32", "--shard-optimizer", "none", "--params", "fp32"]) == 1
    assert main(["plan", "--config", SD3_LORA_EXAMPLE, "--arch", "sd3-medium", "--gpus", "8", "--card", "80"]) == 0
    table = capsys.readouterr().out
    assert "sd3-medium on 8 GPUs" in table and "fits" in table


@pytest.mark.parametrize("example, arch", [("cogvideox/dmdx_stage2_adm.yaml", "cogvideox-2b"),
                                           ("sd35/dmdx_stage2_adm.yaml", "sd3-medium")])
def test_the_dmdx_stage_2_examples_fit_the_80_gib_cards_of_their_recipes(example, arch, capsys, world_of_one):
    """DMDX.md runs stage 2 on nodes of 8 80 GiB GPUs, and ``train`` refuses on a GPU a run the planner
    says does not fit: the SD3-Medium stage 2 (three 2B networks' fp32 weights, grads and AdamW state
    on DP = 8) fits only with its optimizer states sharded."""
    assert main(["plan", "--config", os.path.join(ROOT, "examples", example), "--arch", arch, "--gpus", "8",
                 "--card", "80"]) == 0, capsys.readouterr().err


def test_an_sd3_plan_takes_the_prompt_length_of_the_runs_embedding_shards(tmp_path):
    """SD3 takes prompts of any length: the plan uses the shards' length where they exist (here 16
    tokens), else the pipeline's default 77 CLIP + 256 T5."""
    from adm_megatron.data.text_embeddings import write_embedding_shards
    from adm_megatron.memory.run_plan import resolve_arch, shape_for

    shards = write_embedding_shards(str(tmp_path / "emb"), ["a"], torch.zeros(1, 16, 4096), torch.zeros(16, 4096))
    config = load_config(SD3_LORA_EXAMPLE, [f"data.path={shards}"])
    arch = resolve_arch(config, "sd3-medium")
    assert shape_for(config, arch).text_tokens == 16
    assert shape_for(load_config(SD3_LORA_EXAMPLE), arch).text_tokens == 77 + 256


def test_plan_command_plans_adp_with_and_without_its_pixel_branch(tmp_path, capsys, world_of_one):
    """The CogVideoX DMDX stage 1 (latent discriminator only) is planned with ADP's two phases and no
    fake score. The SD3 one adds the pixel branch, counted from the pipeline's VAE and the encoder's
    config files (the published AutoencoderKL and SAM ViT-B here): their frozen weights, the pixel
    heads in the discriminator, and the branch's work in both phases; without those files it is
    refused in one line naming the missing one."""
    import sys

    from diffusers import AutoencoderKL
    from transformers import SamVisionConfig, SamVisionModel

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import pixel_branch_memory as published

    stage1 = os.path.join(ROOT, "examples", "cogvideox", "dmdx_stage1_adp.yaml")
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", stage1, "--arch", "cogvideox-2b", "--gpus", "8", "--card", "80",
                 "--json", str(out)]) == 0
    latent_only = json.loads(out.read_text())
    assert set(latent_only["phases"]) == {"generator", "discriminator"} and "fake_score" not in latent_only["networks"]
    assert latent_only["settings"]["method"] == "adp" and latent_only["fits"] and "ODE pairs" in latent_only["fixed"]
    assert "pixel backbone (VAE, vision encoder)" not in latent_only["fixed"]
    capsys.readouterr()

    sd3_stage1 = os.path.join(ROOT, "examples", "sd35", "dmdx_stage1_adp.yaml")
    pipe, sam = tmp_path / "pipe", tmp_path / "sam"
    files = [f"model.teacher={pipe}", f"distill.pixel_encoder_path={sam}"]
    plan = ["plan", "--config", sd3_stage1, "--arch", "sd3-medium", "--gpus", "8", "--card", "80", "--json", str(out)]
    assert main([*plan, *files]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the pixel branch is planned from the pipeline's VAE config, {pipe}/vae/config.json, which is not there" \
        in err and "\n" not in err
    with torch.device("meta"):
        vae, encoder = AutoencoderKL(**published.SD3_VAE), SamVisionModel(SamVisionConfig(**published.SAM_VIT_B))
    vae.save_config(str(pipe / "vae"))
    encoder.config.save_pretrained(str(sam))
    assert main([*plan, *files]) in (0, 1)
    with_pixel = json.loads(out.read_text())
    backbone = sum(p.numel() for p in (*vae.parameters(), *encoder.parameters())) * 4
    # GiB in the JSON; the backbone in fp32, as the run holds it
    assert with_pixel["fixed"]["pixel backbone (VAE, vision encoder)"] == round(backbone / 2**30, 6)
    assert with_pixel["phases"]["discriminator"]["transients"]["pixel branch"] > 0
    assert with_pixel["networks"]["discriminator"]["weights"] > latent_only["networks"]["discriminator"]["weights"]
    # the example recomputes the branch; without, its generator-phase work sets the peak
    assert main([*plan, *files, "distill.pixel_recompute=false"]) in (0, 1)
    plain = json.loads(out.read_text())["phases"]["generator"]
    assert plain["peak_moment"] == "discriminator backward" and plain["transients"]["pixel branch"] > 1
    assert plain["peak"] > with_pixel["phases"]["generator"]["peak"]


def test_plan_refuses_what_train_refuses_for_the_family(capsys, monkeypatch):
    """SD3 given video frames was planned (and said to fit) though train refuses it."""
    monkeypatch.setattr("adm_megatron.memory.run_plan.backbone_size", lambda *_, **__: pytest.fail("a model was built"))
    assert main(["plan", "--config", SD3_LORA_EXAMPLE, "--arch", "sd3-medium", "--gpus", "8", "--card", "80",
                 "data.frames=13"]) == 2
    assert capsys.readouterr().err.strip() == (
        "adm-megatron plan: command line: data.frames=13: SD3Transformer2DModel makes images; set data.frames=1")


@pytest.mark.parametrize("args, message", [
    (["--card", "H100"], "argument --card: invalid float value: 'H100'"),  # after a usage block of 9 lines
    (["--card", "80", "--shard-optimizer", "generator,,teacher"],
     "argument --shard-optimizer: '', 'teacher': expected all, none or names among"),  # the empty item was ', teacher'
    # the last silently won (two --config files a user may expect to layer: the first was lost)
    (["--card", "80", "--config", "y.yaml"], "--config given twice ('x.yaml', then 'y.yaml'): give it once"),
])
def test_a_flag_argparse_refuses_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", "x.yaml", "--gpus", "8", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"adm-megatron plan: error: {message}") and err.endswith("(see adm-megatron plan --help)\n")


def test_dmd2_plan_is_within_15_percent_of_measured_peak_of_every_phase(pipelines, tmp_path, world_of_one):
    """DMD2: two phases (its classifier heads sit on the fake score and learn in the fake-score phase,
    on fake and real samples: three fake-score passes with grad); it was planned as ADM, with a
    discriminator phase that never runs."""
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    size = ["data.frames=3", "data.height=16", "data.width=16"]
    (tmp_path / "run.yaml").write_text(f"model: {{teacher: {pipelines[False]}}}\n")
    assert main(["collect-ode", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pairs"),
                 "--num-pairs", "4", "--steps", "2", "--no-progress", "data.num_prompts=4", *size]) == 0
    destroy_parallel()
    initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234)
    figures = plan_and_measure(pipelines[False], str(tmp_path / "out"),
                               ["distill.method=dmd2", f"data.real_path={tmp_path / 'pairs'}", *size])
    assert set(figures) == {"fake_score", "generator"}
    assert_within_tolerance(figures, "dmd2-2b-3x16x16")


def test_the_live_tensors_pass_over_a_dead_weak_proxy():
    """A weak proxy whose object is gone, left in the heap by code run earlier in the process (seen
    after the FP8 and compile tests in one process), made isinstance raise ReferenceError and stopped
    every memory measurement."""
    import weakref

    from adm_megatron.memory.measure import live_tensors

    class Held:
        pass

    held = Held()
    proxies = [weakref.proxy(held)]
    del held
    with pytest.raises(ReferenceError):
        proxies[0].anything  # noqa: B018 - the proxy is dead
    tensor = torch.zeros(3)
    assert any(t is tensor for t in live_tensors())
