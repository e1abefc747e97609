"""Inputs found broken while trying the trainer get one line naming the file and what is wrong,
before any process group, model or output exists: a truncated teacher weights file (or one whose
header is cut), samples asked of a pipeline that has no VAE, and memory settings train cannot do
(sharding with DP = 1, weights offload of a sharded network, unknown modes), and on a GPU a run the
memory planner says does not fit the card, or offload where host memory cannot be pinned; and wandb
online without credentials."""

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


def test_a_teacher_without_a_pipeline_is_told_to_name_one(pipeline_dir, tmp_path):
    """A transformer directory as model.teacher has no schedule: the refusal named
    'scheduler/scheduler_config.json', a path relative to nowhere, as what was expected."""
    teacher = os.path.join(pipeline_dir, "transformer")
    assert _refusal(teacher, str(tmp_path / "run")) == (
        f"model.teacher={teacher}: a transformer directory has no noise schedule; set model.pipeline to its "
        "CogVideoXPipeline directory (its scheduler/scheduler_config.json)")


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


@pytest.mark.parametrize("overrides, message", [
    (["distill.delta_t=1000"], "distill.delta_t=1000: expected 0 < delta_t < 1000 (the teacher's schedule's timesteps)"),
    (["distill.generator_steps=5000"], "distill.generator_steps=5000: the teacher's schedule has 1000 timesteps; "
                                       "expected at most that many steps"),
])
def test_steps_the_teachers_schedule_cannot_take_are_refused_before_building(overrides, message, pipeline_dir,
                                                                             tmp_path):
    """They were ValueErrors with a traceback from the algorithm's or the schedule's constructor, after
    every network was built."""
    assert _refusal(pipeline_dir, str(tmp_path / "run"), "train.num_samples=0", *overrides) == message


@pytest.mark.parametrize("override, message", [
    ("optim.discriminator.offload=gpu", "optim.discriminator.offload='gpu': expected one of none, optimizer, "
                                        "optimizer_and_params"),
    ("model.recompute.teacher=generator:half", "model.recompute.teacher='generator:half': expected one of none, "
                                               "selective, full or PHASE:MODE"),
    ("model.recompute=sometimes", "model.recompute='sometimes': expected true, false"),
    ("model.bf16_params=true", "model.bf16_params=true needs model.dtype=bf16 (got fp32)"),
    ("model.grad_reduce_in_fp32=false", "model.grad_reduce_in_fp32=false applies to bf16 weights (model.bf16_params=true)"),
    ("optim.fake_score={offload: optimizer_and_params, shard_over_dp: true}",
     "optim.fake_score.offload=optimizer_and_params with shard_over_dp=true"),
    ("logging.dead_discriminator_accuracy=7", "logging.dead_discriminator_accuracy=7.0: expected an accuracy in [0, 1]"),
])
def test_bad_memory_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.teacher=x", override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.save_every=-1", "train.keep_checkpoints=-2", "train.sample_every=-1"])
def test_negative_intervals_are_refused_in_one_line(override):
    """``train.save_every=-1`` was taken, and saved a checkpoint after every iteration."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.teacher=x", override])
    assert str(err.value) == f"command line: {override}: must be >= 0"


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


def test_a_run_whose_host_terms_do_not_fit_the_node_is_refused_before_building(pipeline_dir, tmp_path, monkeypatch):
    """On a GPU, train also checks the plan's host terms (offloaded states, a checkpoint's staging) of
    the ranks on this node against the memory the node gives the job: 8 torchrun ranks of a run
    with offloaded optimizer states on a node giving 1 MiB stop in one line; a 64 GiB node takes
    them, and so does the 1 MiB node with train.memory_check=false."""
    from adm_megatron.memory import preflight
    from adm_megatron.memory.plan import GIB
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import validate_run

    run = ["train.num_samples=0", "optim.generator.offload=optimizer", "optim.fake_score.offload=optimizer"]
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 80.0))
    monkeypatch.setattr(preflight, "pinned_memory_works", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(preflight, "host_memory_gib", lambda: 2**20 / GIB)
    message = _refusal(pipeline_dir, str(tmp_path / "run"), *run)
    assert message.startswith("memory plan: host memory: up to ") and "for the 1 rank(s) on this node" in message, message
    teacher = resolve_teacher(pipeline_dir)
    config = [f"model.teacher={pipeline_dir}", "distill.head_every=1", *run]
    with pytest.raises(ConfigError, match=r"^memory plan: host memory: up to .* GiB for the 8 rank\(s\) on this node "
                                          r"\(each .* GiB offloaded, .* this node gives the job 0.0 GiB") as err:
        validate_run(load_config(None, config), teacher, 8)
    assert "\n" not in str(err.value)
    validate_run(load_config(None, [*config, "train.memory_check=false"]), teacher, 8)
    monkeypatch.setattr(preflight, "host_memory_gib", lambda: 64.0)
    validate_run(load_config(None, config), teacher, 8)


def test_the_host_memory_is_the_jobs_cgroup_limit_where_lower(tmp_path, monkeypatch):
    from adm_megatron.memory import preflight
    from adm_megatron.memory.plan import GIB

    limit = tmp_path / "memory.max"
    limit.write_text("max\n")
    monkeypatch.setattr(preflight, "_cgroup_limit_files", lambda: [str(limit), str(tmp_path / "absent")])
    physical = preflight.host_memory_gib()
    assert physical > 0.5
    limit.write_text(f"{2**29}\n")  # SLURM --mem=512M
    assert preflight.host_memory_gib() == 2**29 / GIB


@pytest.mark.parametrize("env, ranks", [({"LOCAL_WORLD_SIZE": "4"}, 4), ({"SLURM_NTASKS_PER_NODE": "8"}, 8),
                                        ({"SLURM_TASKS_PER_NODE": "6(x2)"}, 6), ({"LOCAL_WORLD_SIZE": "16"}, 12)])
def test_the_ranks_sharing_a_node_come_from_the_launcher(env, ranks, monkeypatch):
    from adm_megatron.memory import preflight

    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert preflight.ranks_on_this_node(12) == ranks


def test_samples_that_do_not_fit_the_gpu_are_a_warning_not_a_refusal(pipeline_dir, tmp_path, monkeypatch, caplog,
                                                                    capsys):
    """The samples' decode is planned after the last phase: when training fits the card and the
    samples do not (a 10 GiB decode stands in for CogVideoX's full-size one on an 8 GiB card), train
    warns in one line and goes on (a decode out of memory costs its samples only), and plan says so
    with exit status 0; with train.num_samples=0 there is nothing to warn about."""
    import logging

    from adm_megatron.cli import main
    from adm_megatron.memory import preflight, run_plan
    from adm_megatron.memory.sample_decode import SampleDecode
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import validate_run

    monkeypatch.setattr(run_plan, "count_sample_decode", lambda *a: SampleDecode(vae_bytes=2**20, decode_peak=10 * 2**30))
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 8.0))
    config = [f"model.teacher={pipeline_dir}", "distill.head_every=1", "data.frames=2", "data.height=4", "data.width=4"]
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        validate_run(load_config(None, [*config, "train.num_samples=2"]), resolve_teacher(pipeline_dir), 1)
    warnings = [r.getMessage() for r in caplog.records if "samples need" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], caplog.text
    assert "set train.sample_vae_tiling=true, or train.num_samples=0" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        validate_run(load_config(None, [*config, "train.num_samples=0"]), resolve_teacher(pipeline_dir), 1)
    assert "samples need" not in caplog.text
    capsys.readouterr()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("{}\n")
    assert main(["plan", "--config", str(yaml_file), "--gpus", "1", "--card", "8", *config]) == 0
    out = capsys.readouterr()
    assert "(samples)" in out.out and "adm-megatron plan: warning: the samples need 10.1" in out.err


def test_offload_without_pinned_memory_on_a_gpu_is_refused_in_one_line(pipeline_dir, tmp_path, monkeypatch):
    from adm_megatron.memory import preflight

    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", 80.0))
    monkeypatch.setattr(preflight, "pinned_memory_works", lambda: False)
    message = _refusal(pipeline_dir, str(tmp_path / "run"), "train.num_samples=0", "optim.generator.offload=optimizer")
    assert message.startswith("optim.generator.offload=optimizer: offload needs pinned host memory"), message


def test_trains_pre_flight_plans_adps_pixel_branch(pipeline_dir, tmp_path, monkeypatch):
    """ADP's pixel branch (the VAE decode and a vision encoder, counted on fake tensors) is in the
    plan: a card between the latent-only peak and the peak with the branch takes the first run and
    refuses the second in one line; an encoder directory without its config is refused in one line."""
    from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder

    from adm_megatron.memory import preflight
    from adm_megatron.memory.plan import GIB
    from adm_megatron.memory.run_plan import plan_run

    adp = [f"model.teacher={pipeline_dir}", "distill.method=adp", f"data.real_path={tmp_path}",
           "distill.head_every=1", "data.frames=3", "data.height=16", "data.width=16", "distill.pixel_layers=[2,4]"]
    encoder = save_tiny_encoder("sam", str(tmp_path / "sam"), image_size=64)
    pixel = load_config(None, [*adp, f"distill.pixel_encoder_path={encoder}"])
    latent_only = load_config(None, [*adp, "distill.pixel_weight=0"])
    low, high = (plan_run(c, 1, card_gib=80.0).peak for c in (latent_only, pixel))
    assert high > 1.2 * low  # 9 decoded frames of 128 x 128 per sample
    card = (low + high) / 2 / 0.9 / GIB  # the planner keeps 10% of the card free
    monkeypatch.setattr(preflight, "this_gpu", lambda: ("test card", card))
    preflight.check_run_fits(latent_only, 1, card)
    with pytest.raises(ConfigError, match=r"^memory plan: the \w+ phase needs .* GiB per GPU") as err:
        preflight.check_run_fits(pixel, 1, card)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^memory plan: distill.pixel_weight=0.15: the pixel branch is planned from "
                                          r"distill.pixel_encoder_path's config, sam/config.json, which is not there$"):
        preflight.check_run_fits(load_config(None, [*adp, "distill.pixel_encoder_path=sam"]), 1, card)


def test_a_bad_value_is_blamed_on_where_it_was_set(tmp_path):
    """A value from the command line was reported as the config file's."""
    config = tmp_path / "run.yaml"
    config.write_text("distill:\n  method: foo\noptim:\n  generator: {lr: 1.0e-5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(config), ["train.max_iterations=3"])
    assert str(err.value) == f"{config}: distill.method='foo': expected one of adm, dmd, dmd2, adp"
    config.write_text("distill:\n  method: adm\n")
    for override, message in (("distill.method=bar", "distill.method='bar': expected one of"),
                              ("optim.generator.lr=-1", "optim.generator.lr=-1.0: must be > 0"),
                              ("optim.generator={lr: -1}", "optim.generator.lr=-1.0: must be > 0")):
        with pytest.raises(ConfigError) as err:
            load_config(str(config), [override])
        assert str(err.value).startswith(f"command line: {message}"), err.value


def test_wandb_online_without_credentials_is_refused_before_building(pipeline_dir, tmp_path, monkeypatch):
    """``wandb.init`` raised 'No API key configured' from the first iteration's logger, after the teacher
    and the networks were built: the run is refused at the start instead, and runs with a key."""
    from adm_megatron.train.run_log import check_loggers

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    message = _refusal(pipeline_dir, str(tmp_path / "run"), "logging.wandb_mode=online")
    assert message.startswith("logging.wandb_mode=online but wandb has no credentials")
    assert "logging.wandb_mode=offline" in message
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    check_loggers("online", False)  # a key is enough: nothing is asked of the server here
