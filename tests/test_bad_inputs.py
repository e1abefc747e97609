"""Inputs found broken while trying the trainer get one line naming the file and what is wrong,
before any process group, model or output exists: a truncated teacher weights file (or one whose
header is cut), samples asked of a pipeline that has no VAE, and memory settings train cannot do
(sharding with DP = 1, weights offload of a sharded network, unknown modes), and on a GPU a run the
memory planner says does not fit the card, or offload where host memory cannot be pinned."""

from __future__ import annotations

import os
import shutil

import pytest

from adm_megatron.config import ConfigError, load_config

WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


def _refusal(teacher: str, out: str, *overrides: str) -> str:
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={teacher}", f"output_dir={out}", "train.max_iterations=2",
                                "distill.head_every=1", "logging.wandb_mode=disabled", *overrides])
    with pytest.raises(ConfigError) as err:
        Trainer(config)
    assert not os.path.exists(out)  # nothing started, nothing written
    message = str(err.value)
    assert "\n" not in message
    return message


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_truncated_teacher_is_refused_in_one_line(pipeline_dir, tmp_path):
    teacher = str(tmp_path / "pipe")
    shutil.copytree(pipeline_dir, teacher)
    weights = os.path.join(teacher, WEIGHTS)
    full = os.path.getsize(weights)
    _truncate(weights, full - 100)
    message = _refusal(teacher, str(tmp_path / "run"))
    assert f"{weights}: truncated ({full - 100} bytes, its header needs {full})" in message
    _truncate(weights, 20)  # the header itself cut
    assert f"{weights}: not a readable safetensors file (20 bytes; truncated?)" in _refusal(teacher, str(tmp_path / "run"))


def test_samples_from_a_pipeline_without_vae_are_refused_before_training(pipeline_dir, tmp_path):
    teacher = str(tmp_path / "pipe")
    shutil.copytree(pipeline_dir, teacher)
    shutil.rmtree(os.path.join(teacher, "vae"))
    message = _refusal(teacher, str(tmp_path / "run"), "train.num_samples=2")
    assert message.startswith(f"train.num_samples=2: the pipeline {teacher} has no VAE")


@pytest.mark.parametrize("overrides, message", [
    (["optim.generator.shard_over_dp=true"],
     "optim.generator.shard_over_dp=true: data parallel is 1 (world 1 / tensor_parallel 1 / context_parallel 1)"),
])
def test_sharding_without_data_parallel_is_refused_in_one_line(overrides, message, pipeline_dir, tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert message in _refusal(pipeline_dir, str(tmp_path / "run"), "train.num_samples=0", *overrides)


@pytest.mark.parametrize("override, message", [
    ("optim.discriminator.offload=gpu", "optim.discriminator.offload='gpu': expected one of none, optimizer, "
                                        "optimizer_and_params"),
    ("model.recompute.teacher=generator:half", "model.recompute.teacher='generator:half': expected one of none, "
                                               "selective, full or PHASE:MODE"),
    ("model.recompute=sometimes", "model.recompute='sometimes': expected true, false"),
    ("model.bf16_params=true", "model.bf16_params=true needs model.dtype=bf16 (got fp32)"),
    ("optim.fake_score={offload: optimizer_and_params, shard_over_dp: true}",
     "optim.fake_score.offload=optimizer_and_params with shard_over_dp=true"),
])
def test_bad_memory_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.teacher=x", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_that_does_not_fit_the_gpu_is_refused_before_building(pipeline_dir, tmp_path, monkeypatch):
    """On a GPU, train plans the run with its own memory settings for the card it sees: a run that
    does not fit stops in one line (a 0.1 GiB card stands in for the GPU), the same run fits a 4 GiB
    card, and ``train.memory_check=false`` skips the check."""
    from adm_megatron.memory import preflight
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import validate_run

    run = ["data.frames=3", "data.height=16", "data.width=16", "train.num_samples=0"]
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 0.1))
    message = _refusal(pipeline_dir, str(tmp_path / "run"), *run)
    assert message.startswith("memory plan: the ") and "GiB per GPU, the test card has 0.1 GiB" in message, message
    teacher = resolve_teacher(pipeline_dir)
    config = [f"model.teacher={pipeline_dir}", "distill.head_every=1", *run]
    validate_run(load_config(None, [*config, "train.memory_check=false"]), teacher, 1)
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 4.0))
    validate_run(load_config(None, config), teacher, 1)


def test_offload_without_pinned_memory_on_a_gpu_is_refused_in_one_line(pipeline_dir, tmp_path, monkeypatch):
    from adm_megatron.memory import preflight

    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 80.0))
    monkeypatch.setattr(preflight, "pinned_memory_works", lambda: False)
    message = _refusal(pipeline_dir, str(tmp_path / "run"), "train.num_samples=0", "optim.generator.offload=optimizer")
    assert message.startswith("optim.generator.offload=optimizer: offload needs pinned host memory"), message


def test_the_memory_plan_refuses_adps_pixel_branch_and_trains_pre_flight_skips_only_that(pipeline_dir, tmp_path,
                                                                                        monkeypatch, caplog):
    """ADP's pixel branch (a VAE decode and a vision encoder) is not in the planner's phases:
    ``adm-megatron plan`` refuses such a run in one line, and train's pre-flight on a GPU (a 0.1 GiB
    stand-in card that would refuse the run) skips the plan for it with a warning instead of judging
    it without the branch; latent-only ADP is planned, and that card refuses it."""
    from adm_megatron.memory import preflight
    from adm_megatron.memory.plan import PlanError
    from adm_megatron.memory.run_plan import plan_run

    adp = [f"model.teacher={pipeline_dir}", "distill.method=adp", f"data.real_path={tmp_path}",
           "distill.head_every=1", "data.frames=3", "data.height=16", "data.width=16"]
    pixel = load_config(None, [*adp, "distill.pixel_encoder_path=sam"])
    with pytest.raises(PlanError, match=r"^distill.pixel_weight=0.15: the planner does not model ADP's pixel "
                                        r"branch .*; pixel_weight=0 plans the rest$"):
        plan_run(pixel, 1, card_gib=80.0)
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 0.1))
    with caplog.at_level("WARNING", logger="adm_megatron"):
        preflight.check_run_fits(pixel, 1, 0.1)
    assert "memory pre-flight skipped: distill.pixel_weight=0.15: the planner does not model" in caplog.text
    with pytest.raises(ConfigError, match="memory plan: the "):  # the same card refuses latent-only ADP
        preflight.check_run_fits(load_config(None, [*adp, "distill.pixel_weight=0"]), 1, 0.1)
