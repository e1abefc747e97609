"""What a run leaves behind, through the real command line: metrics.jsonl, wandb offline files,
TensorBoard events,
an atomic checkpoint, the generator as a diffusers directory that diffusers loads and that
generates the generator's own outputs, and sample videos (tests/test_run_samples.py: the pipeline's); a megatron
checkpoint works as the teacher; the example configs parse and give the paper's head counts."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from adm_megatron.config import load_config
from adm_megatron.heads import MultiHeadDiscriminator
from adm_megatron.models import CogVideoXArch, tapped_block_indices
from adm_megatron.families.cogvideox_presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "data.batch_size=1", "data.num_prompts=3", "train.max_iterations=3", "train.num_samples=2",
    "train.save_every=2", "logging.progress=false", "logging.tensorboard=true",
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


@pytest.fixture(scope="module")
def finished_run(pipeline_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "demo")
    cmd = [sys.executable, "-m", "adm_megatron.cli", "train", "--config",
           os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
           f"model.teacher={pipeline_dir}", f"output_dir={out}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir``'s event files, as TensorBoard reads them: (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_run_writes_metrics_wandb_checkpoints_and_prints_where(finished_run):
    out, stdout = finished_run
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert f"outputs in {out}" in stdout and "sample:" in stdout
    assert glob.glob(os.path.join(out, "wandb", "offline-run-*", "*.wandb"))
    events = tensorboard_scalars(os.path.join(out, "tensorboard"))
    for key in ("generator/loss", "discriminator/paired_accuracy", "throughput/iteration_seconds"):
        assert events[key] == [(r["iteration"], pytest.approx(r[key], rel=1e-6)) for r in rows]  # float32 events
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert checkpoints == ["iter_0000002", "iter_0000003", "latest"]  # save_every=2 and the end; no temp dirs
    last = os.path.join(out, "checkpoints", "iter_0000003")
    assert json.load(open(os.path.join(last, "trainer_state.json")))["iteration"] == 3
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "iter_0000003"
    for name in ("generator", "fake_score"):
        assert os.path.isfile(os.path.join(last, name, "adm_megatron_checkpoint.json"))
    assert os.path.isfile(os.path.join(last, "discriminator.pt"))


def test_exported_generator_loads_in_diffusers_and_generates(finished_run, pipeline_dir, world_of_one):
    import imageio.v3 as iio
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.convert.checkpoint import load_megatron_checkpoint
    from adm_megatron.convert.distillation_record import read_distillation_record

    out, _ = finished_run
    exported = CogVideoXTransformer3DModel.from_pretrained(os.path.join(out, "generator"))
    record = read_distillation_record(os.path.join(out, "generator"))  # what it was distilled for
    assert (record["method"], record["generator_steps"], record["iteration"]) == ("adm", 4, 3)
    assert record["teacher"] == pipeline_dir and record["latent_size"] == {"frames": 3, "height": 8, "width": 8}
    from adm_megatron.models.diffusers_files import transformer_fingerprint  # what LoRA adapters would sit on

    fingerprints = record["weights_fingerprints"]
    assert fingerprints["teacher"] == transformer_fingerprint(os.path.join(pipeline_dir, "transformer"))
    assert fingerprints["teacher_kind"] == "diffusers" and fingerprints["schedule"]
    assert fingerprints["generator_init"] is fingerprints["pixel_encoder"] is fingerprints["vae"] is None
    teacher = CogVideoXTransformer3DModel.from_pretrained(os.path.join(pipeline_dir, "transformer"))
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), teacher.parameters()))
    trained = load_megatron_checkpoint(os.path.join(out, "checkpoints", "iter_0000003", "generator"))
    x, text, t = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 16, 32), torch.tensor([999, 499])
    with torch.no_grad():
        ours, theirs = trained(x, text, t).sample, exported(x, text, t).sample
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
    videos = sorted(glob.glob(os.path.join(out, "samples", "*.gif")))
    assert len(videos) == 2
    frames = iio.imread(videos[0])
    assert frames.shape[0] == 9 and frames.shape[-1] == 3


def test_a_megatron_checkpoint_is_a_teacher(finished_run, pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.convert.checkpoint import hf_to_megatron_checkpoint
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.trainer import Trainer

    ckpt = hf_to_megatron_checkpoint(os.path.join(pipeline_dir, "transformer"), str(tmp_path / "ckpt"))
    config = load_config(
        os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
        [f"model.teacher={ckpt}", f"model.pipeline={pipeline_dir}", f"output_dir={tmp_path / 'run'}",
         "logging.wandb_mode=disabled", "logging.progress=false"],
    )
    trainer = Trainer(config)
    reference = build_model_from_hf(os.path.join(pipeline_dir, "transformer"))
    for (name, a), b in zip(trainer.networks.teacher.module.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    assert torch.isfinite(torch.tensor(trainer.train_iteration(0)["generator/loss"]))


@pytest.mark.parametrize("name, preset, heads", [
    ("cogvideox_2b_8step.yaml", "cogvideox-2b", 10), ("cogvideox_5b_8step.yaml", "cogvideox-5b", 14),
])
def test_example_configs_parse_and_give_the_papers_head_counts(name, preset, heads):
    config = load_config(os.path.join(ROOT, "examples/cogvideox", name))
    assert (config.optim.generator.lr, config.optim.fake_score.lr, config.optim.discriminator.lr) == (1e-7, 1e-6, 5e-6)
    assert config.optim.generator.betas == (0.0, 0.99) and config.distill.generator_steps == 8
    assert config.distill.guidance_scale == (5.0, 7.0)
    arch = CogVideoXArch.from_diffusers_config(PRESETS[preset])
    taps = tapped_block_indices(arch.num_layers, config.distill.head_every)
    with torch.device("meta"):
        disc = MultiHeadDiscriminator(len(taps), arch.hidden_size, kind="3d",
                                      hidden_channels=config.distill.head_hidden)
    feature = torch.empty(1, arch.hidden_size, config.data.frames, config.data.height // 2,
                          config.data.width // 2, device="meta")
    assert disc([feature] * len(taps)).shape == (1, heads)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adm_megatron.cli", "train", "--config",
         os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), "distill.ttur=0"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("adm-megatron: config error: ") and "distill.ttur=0: must be >= 1" in last


def test_version_names_the_stack_on_one_line(capsys):
    import importlib.metadata
    import platform

    import diffusers

    from adm_megatron.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out
    # pip's versions (adm_megatron.versions), torch's own for torch (below)
    assert line == (f"adm-megatron {importlib.metadata.version('adm-megatron')} (python {platform.python_version()}, "
                    f"torch {torch.__version__}, megatron-core {importlib.metadata.version('megatron-core')}, "
                    f"transformer-engine {_installed('transformer-engine')}, torchao {_installed('torchao')}, "
                    f"diffusers {diffusers.__version__}, "
                    f"transformers {importlib.metadata.version('transformers')})\n")


def test_versions_keep_torchs_build(monkeypatch):
    """PyPI's CUDA torch wheels say ``2.11.0`` in pip's metadata and ``2.11.0+cu130`` in
    ``torch.__version__``: the build is what a bug report needs."""
    import importlib.metadata

    from adm_megatron.versions import stack_versions

    pip_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "2.11.0" if d == "torch" else pip_version(d))
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert stack_versions()["torch"] == "2.11.0+cu130"
    monkeypatch.undo()
    assert type(stack_versions()["torch"]) is str  # torch.__version__ is a TorchVersion, which YAML cannot write


def _installed(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def test_tensorboard_keeps_one_value_per_iteration_across_starts_and_takes_image_samples(tmp_path, monkeypatch):
    """A start after a crash logs again the iterations past its checkpoint: TensorBoard shows the
    new values only (purged as metrics.jsonl is trimmed), skipped flags as 0 / 1, png samples as images.
    Without the package, logging.tensorboard is refused before anything is built."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adm_megatron.config import ConfigError
    from adm_megatron.train.run_log import RunLogger, check_loggers

    out = str(tmp_path / "run")
    first = RunLogger(out, {}, 5, 0, True, wandb_mode="disabled", progress=False, tensorboard=True)
    for i in range(4):  # crashed after iteration 3; its checkpoint is at 2
        first.log({"iteration": i, "generator/loss": float(i), "generator/skipped": i == 1})
    first.close()
    png = str(tmp_path / "sample_0.png")
    Image.new("RGB", (6, 4), (255, 0, 0)).save(png)
    again = RunLogger(out, {}, 5, 2, True, wandb_mode="disabled", progress=False, tensorboard=True)
    for i in range(2, 5):
        again.log({"iteration": i, "generator/loss": 10.0 * i, "generator/skipped": False}, last=i == 4)
    again.media(4, [png])
    again.close()
    scalars = tensorboard_scalars(os.path.join(out, "tensorboard"))
    assert scalars["generator/loss"] == [(0, 0.0), (1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert [v for _, v in scalars["generator/skipped"]] == [0.0, 1.0, 0.0, 0.0, 0.0]
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    image = events.Images("samples/sample_0.png")
    assert [(e.step, e.width, e.height) for e in image] == [(4, 6, 4)]

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "tensorboard" else object())
    with pytest.raises(ConfigError, match=r"^logging.tensorboard=true needs the tensorboard package: pip install"):
        check_loggers("disabled", True)
    check_loggers("disabled", False)


def test_a_wandb_that_fails_leaves_the_run_going_and_its_metrics_whole(tmp_path, caplog):
    """A job-wide SIGTERM (scancel, a preemption) reaches wandb's service process first: its finish()
    raised ConnectionResetError after the preemption's checkpoint, rank 0 ended in a traceback and exit
    1. wandb is a report: a failing call is one warning, the run goes on without it."""
    import logging

    from adm_megatron.train.run_log import RunLogger

    class DeadService:
        calls = []

        def log(self, *args, **kwargs):
            self.calls.append("log")
            raise ConnectionResetError("Connection lost")

        def finish(self):
            self.calls.append("finish")
            raise ConnectionResetError("Connection lost")

    out = str(tmp_path / "run")
    log = RunLogger(out, {}, 3, 0, True, wandb_mode="disabled", progress=False)
    log.wandb = DeadService()
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        for i in range(3):
            log.log({"iteration": i, "generator/loss": 1.0})
        log.close()
    assert DeadService.calls == ["log"]  # once: the run went on without it
    assert [r.getMessage() for r in caplog.records] == [
        "wandb log failed (Connection lost); the run goes on without wandb (metrics.jsonl has "
        "every record)"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [0, 1, 2]

    finishing = RunLogger(str(tmp_path / "again"), {}, 1, 0, True, wandb_mode="disabled", progress=False)
    finishing.wandb = DeadService()
    DeadService.calls.clear()
    finishing.close()  # no traceback
    assert DeadService.calls == ["finish"]


_SERVICE_KILLED = """
import sys, time, psutil
from adm_megatron.train.run_log import RunLogger
log = RunLogger(sys.argv[1], {}, 3, 0, True, wandb_mode="offline", progress=False)
services = psutil.Process().children(recursive=True)
assert services, "wandb started no service process"
for service in services:  # as scancel's SIGTERM reaches every process of the step
    service.terminate()
psutil.wait_procs(services, timeout=30)
time.sleep(1)
for i in range(3):
    log.log({"iteration": i, "generator/loss": 1.0})
log.close()
print("closed")
"""


def test_a_real_wandb_whose_service_was_killed_ends_without_a_traceback(tmp_path):
    """The real wandb (offline): its service process killed as scancel kills it, the run's logging
    goes on in one warning and the process ends cleanly -- wandb's own exit hook printed
    "Exception ignored in atexit callback" and a ConnectionResetError traceback after the run's last
    line."""
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", _SERVICE_KILLED, out], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, WANDB_SILENT="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("closed")
    assert "wandb log failed" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [0, 1, 2]
