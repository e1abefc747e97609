"""Exact resume through the real command line: a run killed with SIGKILL at several moments (after
an iteration, in the middle of a checkpoint save, right after the ``latest`` marker moved) and
started again with the same command each time leaves no process of its own behind, goes on from its latest complete checkpoint, does
only the iterations after it, and ends with every metric of every iteration and the exported
weights bit-for-bit equal to an uninterrupted run's. A finished run's command does nothing and
writes nothing; a different config pointed at its output_dir, ``train.resume=never`` there, and
an output_dir that is a file are refused in one line. Config keys newer than a saved run pass at their
defaults; the kernel options may change between invocations."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 8
RUN = [  # EMA, TTUR and per-network lr schedules: every piece of state a resume must restore
    "train.max_iterations=8", "train.save_every=2", "train.keep_checkpoints=2", "train.num_samples=0",
    "train.ema_decay=0.9", "distill.ttur=2", "optim.fake_score.warmup_iters=2",
    "optim.generator.decay_style=cosine", "optim.discriminator.decay_style=linear",
    "data.batch_size=1", "logging.wandb_mode=disabled", "logging.progress=false",
]


def _command(pipeline_dir, out, *extra):
    return [sys.executable, "-m", "adm_megatron.cli", "train", "--config",
            os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"model.teacher={pipeline_dir}",
            f"output_dir={out}", *RUN, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _metrics(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by the kill
            pass
    return rows


def _latest(out) -> str | None:
    try:
        return open(os.path.join(out, "checkpoints", "latest")).read().strip()
    except OSError:
        return None


def _saving(out) -> bool:
    root = os.path.join(out, "checkpoints")
    return os.path.isdir(root) and any(".tmp-" in n for n in os.listdir(root))


def _run_until_killed(cmd, out, moment, log: str, timeout=300) -> str | None:
    """Start ``cmd``, SIGKILL it when ``moment()`` holds, check that none of the processes it
    started (megatron's checkpoint writers) outlive it; return the latest checkpoint it left."""
    children: dict[int, psutil.Process] = {}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while not moment():
                assert proc.poll() is None, f"the run ended before its kill point:\n{open(log).read()[-3000:]}"
                assert time.monotonic() < deadline, "kill point never reached"
                with contextlib.suppress(psutil.Error):
                    children.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
                time.sleep(0.005)
            with contextlib.suppress(psutil.Error):
                children.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    _, alive = psutil.wait_procs(list(children.values()), timeout=15)
    for orphan in alive:  # (stopped here so that the test leaves nothing behind either)
        orphan.kill()
    assert not alive, f"processes left behind by the killed run: {[p.pid for p in alive]}"
    return _latest(out)


def _finish(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["iteration"] for r in got] == list(range(ITERATIONS))  # each iteration once
    for a, b in zip(got, want):
        assert without_timing(a) == without_timing(b)


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(glob.glob(os.path.join(out, "generator", "*.safetensors"))[0])


def _files(out) -> dict[str, tuple]:
    return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size)
            for p in glob.glob(os.path.join(out, "**"), recursive=True)}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


@pytest.fixture(scope="module")
def uninterrupted(pipeline_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    proc = _finish(_command(pipeline_dir, out))
    assert f"{ITERATIONS} iterations ({ITERATIONS} trained now)" in proc.stdout
    return out


@pytest.mark.parametrize("saving", [  # the fast suite keeps the background save (its kill moments include the writer's)
    pytest.param([], marks=pytest.mark.slow), ["train.async_save=true"]], ids=["synchronous", "background"])
def test_sigkill_at_several_moments_then_the_same_command_resumes_exactly(saving, pipeline_dir, uninterrupted,
                                                                         tmp_path):
    """With background saves too: there the kill "during a checkpoint save" lands while iter_0000004's
    writer process runs beside the training, and the writer must end with the trainer."""
    out = str(tmp_path / "run")
    cmd = _command(pipeline_dir, out, *saving)
    logged_past = random.Random(os.getpid()).choice([3, 4])  # after an iteration, somewhere after iter_2
    moments = [
        ("after an iteration", lambda: len(_metrics(out)) > logged_past and _latest(out) is not None),
        ("during a checkpoint save", lambda: _saving(out) and _latest(out) == "iter_0000004"),
        ("right after the latest marker moved", lambda: _latest(out) == "iter_0000006"),
    ]
    left = []  # the latest checkpoint each killed invocation left
    for index, (name, moment) in enumerate(moments):
        log = str(tmp_path / f"invocation-{index}.log")
        left.append(_run_until_killed(cmd, out, moment, log))
        assert left[-1] is not None, name
        if name == "during a checkpoint save":  # the kill did land in the middle of a save
            assert any(".tmp-" in n for n in os.listdir(os.path.join(out, "checkpoints")))
        if index:  # this invocation went on from the checkpoint the one before left
            assert f"resumed from {os.path.join(out, 'checkpoints', left[index - 1])}:" in open(log).read()
    final = _finish(cmd)
    start = int(left[-1].split("_")[1])
    assert f"resumed from {os.path.join(out, 'checkpoints', left[-1])}:" in final.stderr
    assert f"{ITERATIONS} iterations ({ITERATIONS - start} trained now)" in final.stdout  # no work redone
    _same_metrics(_metrics(out), _metrics(uninterrupted))
    want, got = _weights(uninterrupted), _weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["iter_0000006", "iter_0000008", "latest"]  # keep_checkpoints=2, nothing half-written


def test_a_finished_run_started_again_does_nothing_and_other_configs_are_refused(pipeline_dir, uninterrupted,
                                                                                  tmp_path, world_of_one, capsys):
    from adm_megatron.cli import main

    before = _files(uninterrupted)
    again = _finish(_command(pipeline_dir, uninterrupted))
    assert f"{ITERATIONS} iterations (0 trained now)" in again.stdout
    assert _files(uninterrupted) == before  # nothing written, nothing touched

    refusals = {
        "optim.generator.lr=1e-3": "config.yaml: optim.generator.lr=0.0001 there but 0.001 now",
        "train.resume=never": "already holds a run and train.resume=never",
        "train.max_iterations=10": "config.yaml: train.max_iterations=8 there but 10 now; "
                                   "optim.generator.decay_style=cosine decays the learning rate over the run's length",
    }
    capsys.readouterr()
    for override, message in refusals.items():  # in this process: the refusals come before any work
        assert main(_command(pipeline_dir, uninterrupted, override)[3:]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert _files(uninterrupted) == before

    a_file = tmp_path / "a-file"
    a_file.write_text("not a run")
    assert main(_command(pipeline_dir, str(a_file))[3:]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a directory" in err
    assert len(err.strip().splitlines()) == 1 and a_file.read_text() == "not a run"


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _last_shard(part: str) -> str:
    """A checkpoint part's last shard file (how many a rank writes is megatron-core's choice)."""
    return sorted(glob.glob(os.path.join(part, "__*.distcp")))[-1]


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _unfinished_copy(run: str, out: str) -> str:
    import shutil

    shutil.copytree(run, out)
    os.remove(os.path.join(out, "finished.json"))  # as if stopped after its last checkpoint
    return out


DAMAGES = {  # how the latest checkpoint (iter_0000008) is damaged -> the file the refusal names
    "truncated optimizer shard": (lambda c: _truncate(glob.glob(os.path.join(c, "train_state", "__0_0.distcp"))[0]),
                                  "train_state: shard file __0_0.distcp is truncated"),
    "missing weight shard": (lambda c: os.remove(_last_shard(os.path.join(c, "generator"))),
                             "generator: shard file __0_"),  # __0_1 with megatron-core 0.16, __0_0 from 0.17
    "unreadable shard index": (lambda c: _truncate(os.path.join(c, "fake_score", ".metadata")),
                               "fake_score/.metadata: unreadable checkpoint metadata"),
    "corrupt discriminator heads": (lambda c: _flip_a_byte(os.path.join(c, "discriminator.pt")),
                                    "discriminator.pt"),
    "cut run state": (lambda c: _truncate(os.path.join(c, "trainer_state.json")), "trainer_state.json: unreadable"),
    "missing discriminator heads": (lambda c: os.remove(os.path.join(c, "discriminator.pt")),
                                    "discriminator.pt: missing (the checkpoint lists it)"),
    "missing fake score": (lambda c: shutil.rmtree(os.path.join(c, "fake_score")),
                           "fake_score: missing (the checkpoint lists it)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_is_refused_in_one_line_naming_the_newest_whole_one(damage, pipeline_dir,
                                                                                       uninterrupted, tmp_path):
    """A checkpoint's files damaged after it was written (a cut copy, a full quota, a node lost before
    its data reached the disk) are found from the checkpoint's own records before anything loads:
    the refusal names the file and the newest whole checkpoint (iter_0000006) to start from."""
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.resume import plan_resume

    out = _unfinished_copy(uninterrupted, str(tmp_path / "run"))
    latest = os.path.join(out, "checkpoints", "iter_0000008")
    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                         [f"model.teacher={pipeline_dir}", f"output_dir={out}", *RUN])
    assert plan_resume(config, 1).checkpoint == latest  # whole: it would be loaded
    damage_fn, named = DAMAGES[damage]
    damage_fn(latest)
    with pytest.raises(ConfigError) as refusal:
        plan_resume(config, 1)
    message = str(refusal.value)
    assert message.startswith(f"{latest}: damaged checkpoint, nothing was loaded") and "\n" not in message
    assert named in message, message
    assert message.endswith(f"start from the newest whole one once with train.resume="
                            f"{os.path.join(out, 'checkpoints', 'iter_0000006')}")


@pytest.mark.parametrize("marker", ["", "iter_0000010"])
def test_a_latest_marker_naming_no_checkpoint_is_refused_naming_the_newest_whole_one(marker, pipeline_dir,
                                                                                     uninterrupted, tmp_path):
    """checkpoints/latest emptied, or naming a checkpoint that is gone: the same one-line refusal,
    pointing at the newest whole checkpoint there is (iter_0000008)."""
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.resume import plan_resume

    out = _unfinished_copy(uninterrupted, str(tmp_path / "run"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write(marker + "\n")
    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                         [f"model.teacher={pipeline_dir}", f"output_dir={out}", *RUN])
    with pytest.raises(ConfigError) as refusal:
        plan_resume(config, 1)
    message = str(refusal.value)
    named = os.path.join(out, "checkpoints", marker)
    assert message.startswith(f"{named}: damaged checkpoint, nothing was loaded (") and "\n" not in message
    assert message.endswith(f"train.resume={os.path.join(out, 'checkpoints', 'iter_0000008')}")


def test_a_run_refused_for_a_damaged_checkpoint_goes_on_from_the_one_named_exactly(pipeline_dir, uninterrupted,
                                                                                   tmp_path):
    """Through the command line: the refusal (exit 2, one line, nothing trained or written), then the
    command with the named checkpoint, whose run ends bit for bit as the uninterrupted one."""
    out = _unfinished_copy(uninterrupted, str(tmp_path / "run"))
    _truncate(_last_shard(os.path.join(out, "checkpoints", "iter_0000008", "train_state")))
    before = _files(out)
    proc = subprocess.run(_command(pipeline_dir, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "damaged checkpoint" in proc.stderr and _files(out) == before
    earlier = os.path.join(out, "checkpoints", "iter_0000006")
    again = _finish(_command(pipeline_dir, out, f"train.resume={earlier}"))
    assert f"{ITERATIONS} iterations (2 trained now)" in again.stdout
    _same_metrics(_metrics(out), _metrics(uninterrupted))
    want, got = _weights(uninterrupted), _weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_keys_newer_than_a_saved_run_pass_at_their_defaults_and_kernels_may_change():
    """A run saved before a config key existed (its config.yaml lacks it) resumes when the key is at
    its default -- the behaviour the run was trained with -- and is refused in one line otherwise;
    the kernel options (attention backend, FP8, compile) may change between invocations."""
    from adm_megatron.config import ConfigError, config_to_dict, load_config
    from adm_megatron.train.resume import check_compatible

    config = load_config(None, ["model.teacher=x", "distill.method=adm"])
    saved = config_to_dict(config)
    del saved["distill"]["fake_score_grad"]  # as an adm_megatron before the key wrote it
    check_compatible(saved, config, "old/config.yaml")
    newer = load_config(None, ["model.teacher=x", "distill.method=adm", "distill.fake_score_grad=false"])
    with pytest.raises(ConfigError, match=r"^old/config.yaml: distill.fake_score_grad absent there \(the run is "
                                          r"older than it: trained as its default True\) but False now"):
        check_compatible(saved, newer, "old/config.yaml")
    # a key only other methods read changes nothing here: an ADP weight, or DMD2's GAN weight, may change
    check_compatible(saved, load_config(None, ["model.teacher=x", "distill.method=adm", "distill.latent_weight=0.5",
                                               "distill.gan_weight=0.3"]), "old/config.yaml")
    with pytest.raises(ConfigError, match=r"^run: distill.gan_weight="):  # but not under the method that reads it
        dmd2 = ["model.teacher=x", "distill.method=dmd2", "data.real_path=pairs"]
        check_compatible(config_to_dict(load_config(None, dmd2)), load_config(None, [*dmd2, "distill.gan_weight=0.3"]),
                         "run")
    check_compatible(config_to_dict(config), load_config(None, [
        "model.teacher=x", "distill.method=adm", "model.compile=blocks", "model.attention_backend=math"]), "run")
    with pytest.raises(ConfigError, match="distill.delta_t"):  # an existing key still may not change
        check_compatible(config_to_dict(config), load_config(None, ["model.teacher=x", "distill.delta_t=7"]), "run")


def test_a_refused_change_names_the_section_and_what_to_do_instead():
    """A LoRA run resumed with ``model.lora=null`` names ``model.lora`` (not one of its fields), and a
    run that goes on with another run's checkpoint (``train.resume=PATH``) is told that a different
    run starts without it, not that it needs a new output directory (it has one)."""
    from adm_megatron.config import ConfigError, config_to_dict, load_config
    from adm_megatron.train.resume import check_compatible

    lora = load_config(None, ["model.teacher=x", "model.lora.rank=8", "model.lora.alpha=8"])
    saved = config_to_dict(lora)
    with pytest.raises(ConfigError) as err:
        check_compatible(saved, load_config(None, ["model.teacher=x"]), "run/config.yaml")
    assert str(err.value).startswith(f"run/config.yaml: model.lora={saved['model']['lora']!r} there but None now; "
                                     "a run cannot change it (a different run needs a new output_dir)")
    with pytest.raises(ConfigError) as err:
        check_compatible(saved, load_config(None, ["model.teacher=x", "model.lora.rank=4", "model.lora.alpha=8",
                                                   "train.resume=old/checkpoints/iter_0000015"]), "iter_0000015")
    assert str(err.value) == ("iter_0000015: model.lora.rank=8 there but 4 now; a run cannot change it "
                              "(train.resume=PATH goes on with that run; a different one starts without it (from "
                              "that run's exported generator: model.generator_init))")


def test_a_key_the_data_source_does_not_read_is_warned_of_and_may_change():
    """data.num_prompts under data.source=shards (and data.path under synthetic) changes nothing: it
    passed without a word at the start but refused a resume that changed it."""
    from adm_megatron.config import ConfigError, config_to_dict, load_config, start_warnings
    from adm_megatron.train.resume import check_compatible

    shards = ["model.teacher=x", "data.source=shards", "data.path=emb"]
    config = load_config(None, [*shards, "data.num_prompts=5"])
    assert "data.num_prompts=5 applies to data.source=synthetic only: data.source=shards does not read it" in (
        start_warnings(config))
    check_compatible(config_to_dict(load_config(None, shards)), config, "run/config.yaml")
    synthetic = load_config(None, ["model.teacher=x", "data.path=emb"])
    assert "data.path='emb' applies to data.source=shards only: data.source=synthetic does not read it" in (
        start_warnings(synthetic))
    with pytest.raises(ConfigError, match="data.num_prompts=64 there but 5 now"):  # read by the synthetic source
        check_compatible(config_to_dict(synthetic), load_config(None, ["model.teacher=x", "data.num_prompts=5"]),
                         "run/config.yaml")


def test_a_constant_lr_run_is_lengthened_exactly_and_never_cut_below_what_it_did(tmp_path, world_of_one):
    """A finished run started again with a larger train.max_iterations goes on from its last
    checkpoint, and its records equal those of a run that had the longer length from the start
    (fp64; constant learning rates, a warmup included); a length below what a run did is refused.
    starts.jsonl has a line for each start that trained, with where it went on from."""
    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)

    def trainer(out: str, iterations: int) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={out}",
                                          *tiny_fp64_run(iterations), "optim.fake_score.warmup_iters=2",
                                          "train.ema_decay=0.5"]))

    lengthened, whole = str(tmp_path / "lengthened"), str(tmp_path / "whole")
    assert trainer(lengthened, 3).fit().trained == 3
    result = trainer(lengthened, 5).fit()
    assert (result.iterations, result.trained) == (5, 2)
    trainer(whole, 5).fit()
    assert [without_timing(r) for r in _metrics(lengthened)] == [without_timing(r) for r in _metrics(whole)]
    assert trainer(lengthened, 5).fit().trained == 0  # finished at its new length
    starts = [json.loads(line) for line in open(os.path.join(lengthened, "starts.jsonl"))]  # the finished one: none
    assert [(s["start_iteration"], s["resumed_from"]) for s in starts] == [
        (0, None), (3, os.path.join(lengthened, "checkpoints", "iter_0000003"))]
    assert starts[1]["layout"] == {"tensor_parallel": 1, "context_parallel": 1, "data_parallel": 1}
    assert starts[1]["versions"]["torch"] == torch.__version__  # with its build (adm_megatron.versions)
    assert starts[1]["versions"]["megatron-core"]
    with pytest.raises(ConfigError) as err:
        trainer(lengthened, 4)
    assert str(err.value).endswith("the run has done 5 iterations, more than train.max_iterations=4; a run can be "
                                   "lengthened, not cut below what it has done")


def test_a_run_started_from_another_runs_checkpoint_goes_on_from_its_own_when_started_again(tmp_path, world_of_one,
                                                                                            caplog):
    """train.resume=PATH (another run's checkpoint) starts a run; the same command again -- a requeued
    job -- goes on from the run's own latest checkpoint, not from PATH (which went back each time and
    grafted the other run's checkpoint onto this run's history)."""
    import logging

    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")

    def trainer(out: str, iterations: int, *extra: str) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={out}",
                                          *tiny_fp64_run(iterations), "train.save_every=1", *extra]))

    assert trainer(first, 2).fit().trained == 2
    start = os.path.join(first, "checkpoints", "iter_0000001")
    assert trainer(second, 3, f"train.resume={start}").fit().trained == 2  # iterations 1 and 2
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        result = trainer(second, 4, f"train.resume={start}").fit()
    assert (result.iterations, result.trained) == (4, 1)
    assert any(r.getMessage().endswith("goes on from its latest, iter_0000003 (a path outside output_dir is where a "
                                       "run starts)") for r in caplog.records)
    assert [r["iteration"] for r in _metrics(second)] == [1, 2, 3]
    starts = [json.loads(line)["resumed_from"] for line in open(os.path.join(second, "starts.jsonl"))]
    assert starts == [start, os.path.join(second, "checkpoints", "iter_0000003")]


def test_a_rollback_is_done_once_per_launch_and_a_requeue_goes_on_from_what_it_did_since(tmp_path, world_of_one,
                                                                                         monkeypatch, caplog):
    """train.resume naming an earlier checkpoint of the run's own goes back to it, and ``latest`` names
    it from that start on (a start that dies before its first save leaves the run there, not at the
    abandoned later checkpoints). The same SLURM job requeued with the same command goes on from the
    run's latest instead of going back again (it went back at each requeue before, losing the work);
    a new job, or a process started by hand, goes back again. starts.jsonl records the rollback and
    the keys a start changed from config.yaml."""
    import logging

    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = str(tmp_path / "run")
    back = os.path.join(out, "checkpoints", "iter_0000001")

    def trainer(iterations: int, *extra: str) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={out}",
                                          *tiny_fp64_run(iterations), "train.save_every=1", *extra]))

    def job(job_id: str, requeues: int) -> None:
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(requeues))

    assert trainer(3).fit().trained == 3
    job("77", 0)
    dying = trainer(4, f"train.resume={back}")
    assert dying.start_iteration == 1

    def killed(iteration):
        raise RuntimeError("killed before its first save")

    monkeypatch.setattr(dying, "train_iteration", killed)
    with pytest.raises(RuntimeError):
        dying.fit()
    assert _latest(out) == "iter_0000001"  # not iter_0000003, which the rollback abandoned
    job("77", 1)
    assert trainer(4, f"train.resume={back}").fit().trained == 3  # from latest, the rollback point: 1, 2, 3
    job("77", 2)
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        assert trainer(5, f"train.resume={back}").fit().trained == 1  # from iter_0000004, not back to 1
    assert any(r.getMessage().startswith(f"train.resume={back}: this launch (slurm::77) went back to iter_0000001 at "
                                         "its start of ") and r.getMessage().endswith(
        "so started again it goes on from the run's latest, iter_0000004 (a new job goes back again)")
        for r in caplog.records)
    job("78", 0)  # a new job asks for it again: it goes back
    assert trainer(5, f"train.resume={back}").start_iteration == 1
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert trainer(5, f"train.resume={back}").start_iteration == 1  # by hand: each start is a launch
    starts = [json.loads(line) for line in open(os.path.join(out, "starts.jsonl"))]
    assert [(s["start_iteration"], s["rolled_back_to"], s["launch"], s["restart_counts"]) for s in starts] == [
        (0, None, None, [0, 0]), (1, "iter_0000001", "slurm::77", [0, 0]), (1, None, "slurm::77", [1, 0]),
        (4, None, "slurm::77", [2, 0])]
    assert starts[0]["config_changes"] == {}
    assert starts[1]["config_changes"] == {"train.max_iterations": [3, 4], "train.resume": ["auto", back]}
    assert starts[3]["config_changes"]["train.max_iterations"] == [3, 5]


def test_a_launch_is_known_by_its_slurm_job_or_torchrun_rendezvous_on_every_rank():
    """What tells a requeue or restart from a new launch is the same on every rank of a launch."""
    from adm_megatron.train.run_starts import launch_identity, restart_counts

    node = {"TORCHELASTIC_RUN_ID": "r1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert launch_identity(node) == launch_identity({**node, "LOCAL_RANK": "3", "RANK": "11"}) == "torchrun:r1:n0:29500"
    assert restart_counts(node) == [0, 2]
    assert launch_identity({**node, "SLURM_JOB_ID": "5", "SLURM_CLUSTER_NAME": "c"}) == "slurm:c:5"
    assert restart_counts({**node, "SLURM_RESTART_COUNT": "1"}) == [1, 2]
    assert launch_identity({"RANK": "0"}) is None


def test_a_finished_run_whose_checkpoints_were_removed_is_not_trained_anew(tmp_path, world_of_one):
    """Its checkpoints deleted to save room, a finished run started again (a requeue) trained from
    the start over its own outputs -- metrics, generator/ -- as if new; it is refused in one line
    and nothing is touched. A run stopped before its first checkpoint still starts again."""
    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = str(tmp_path / "run")
    overrides = [f"model.teacher={pipeline_dir}", f"output_dir={out}", *tiny_fp64_run(1)]
    assert Trainer(load_config(None, overrides)).fit().trained == 1
    shutil.rmtree(os.path.join(out, "checkpoints"))
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    with pytest.raises(ConfigError) as err:
        Trainer(load_config(None, overrides))
    assert str(err.value) == (f"output_dir={out!r}: the run there finished (finished.json) but has no checkpoint to go "
                              "on from (checkpoints/ removed?); its outputs are kept and nothing was written: use a "
                              "new output_dir")
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    other = str(tmp_path / "other")  # the same from a run started off another run's checkpoint (its requeue)
    Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={other}", *tiny_fp64_run(1)])).fit()
    with pytest.raises(ConfigError, match="the run there finished"):
        Trainer(load_config(None, [*overrides, f"train.resume={other}"]))
    os.remove(os.path.join(out, "finished.json"))  # as a run stopped before its first checkpoint leaves it
    assert Trainer(load_config(None, overrides)).fit().trained == 1


def test_a_non_empty_output_dir_that_is_no_run_is_refused_before_anything_is_written(tmp_path):
    """A directory with other files (another program's, or a generator/ copied there by hand) is not a
    run to go on with: training into it would replace them. Only a lock left by a start killed before
    it wrote config.yaml is taken as an empty directory."""
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.resume import plan_resume

    prev = tmp_path / "prev"
    (prev / "generator").mkdir(parents=True)
    (prev / "generator" / "diffusion_pytorch_model.safetensors").write_text("precious")
    (prev / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        plan_resume(load_config(None, ["model.teacher=x", f"output_dir={prev}"]), 1)
    assert str(err.value) == (f"output_dir={str(prev)!r}: not empty (generator, metrics.jsonl) and not a run of "
                              "adm-megatron (no config.yaml or checkpoints/); nothing was written: use a new or "
                              "empty output_dir")
    assert (prev / "generator" / "diffusion_pytorch_model.safetensors").read_text() == "precious"
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".run.lock").write_text("host h, pid 1\n")
    assert plan_resume(load_config(None, ["model.teacher=x", f"output_dir={killed}"]), 1).checkpoint is None


def test_an_output_dir_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
    """Below a file, or in a directory this user cannot write: a traceback from the first write before."""
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.resume import plan_resume

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=f"^output_dir='{tmp_path}/afile/sub': {tmp_path}/afile is a file, not a "
                                          "directory$"):
        plan_resume(load_config(None, ["model.teacher=x", f"output_dir={tmp_path / 'afile' / 'sub'}"]), 1)
    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access  # the tests run as root, whom no mode stops: the check asks os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    with pytest.raises(ConfigError, match=f"^output_dir='{locked}/run': {locked} is not writable by this user$"):
        plan_resume(load_config(None, ["model.teacher=x", f"output_dir={locked / 'run'}"]), 1)


def test_a_resume_from_another_live_run_holds_its_checkpoint_until_loaded(pipeline_dir, uninterrupted, tmp_path):
    """train.resume=RUN of a run still training (keep_checkpoints): the checkpoint it resolves is held
    from the checks until the load (trainer.py releases it), so that run's pruning skips it meanwhile."""
    from adm_megatron.config import load_config
    from adm_megatron.train.checkpoint import _prune
    from adm_megatron.train.resume import plan_resume

    live = _unfinished_copy(uninterrupted, str(tmp_path / "live"))
    chosen = os.path.join(live, "checkpoints", "iter_0000008")
    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                         [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path / 'new'}", f"train.resume={live}",
                          *RUN])
    point = plan_resume(config, 1)
    assert point.checkpoint == chosen
    shutil.copytree(chosen, os.path.join(live, "checkpoints", "iter_0000010"))  # the live run saves on
    _prune(live, 1, keep="iter_0000010")
    assert os.path.isdir(chosen) and not os.path.isdir(os.path.join(live, "checkpoints", "iter_0000006"))
    point.hold.release()  # loaded
    _prune(live, 1, keep="iter_0000010")
    assert not os.path.isdir(chosen)


@pytest.mark.parametrize("changed", ["weights", "schedule", "generator_init"])
def test_a_run_resumed_with_its_teacher_replaced_is_refused_in_one_line(changed, cogvideox_pipeline, tmp_path):
    """The teacher is read from ``model.teacher`` at every start, never from a checkpoint: its weights or
    its noise schedule replaced between two starts (a newer hub snapshot, a re-converted checkpoint)
    changed the real score and the discriminator's backbone for the rest of the run without a word. A
    checkpoint records their fingerprints, and a resume over other files is refused in one line before
    anything is built (train/input_identity.py). So is ``model.generator_init`` (a LoRA generator's
    base, read at every start): replaced, the run went on and recorded the new files' fingerprint, so
    sampling its adapters on the wrong base passed the check meant to refuse it."""
    from safetensors.torch import save_file
    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.models.diffusers_files import transformer_fingerprint, weight_files
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    teacher = shutil.copytree(cogvideox_pipeline, tmp_path / "teacher")
    init = shutil.copytree(cogvideox_pipeline + "/transformer", tmp_path / "init")
    out = tmp_path / "run"
    inputs = [f"model.teacher={teacher}", *([f"model.generator_init={init}", "model.lora.rank=2",
                                             "model.lora.target_modules=[to_out.0]"]
                                            if changed == "generator_init" else [])]

    def trainer(iterations: int) -> Trainer:
        return Trainer(load_config(None, [*inputs, f"output_dir={out}", *tiny_fp64_run(iterations)]))

    try:
        assert trainer(1).fit().trained == 1
        destroy_parallel()
        trainer(2)  # the same teacher: it goes on
        destroy_parallel()
        if changed in ("weights", "generator_init"):
            (file,) = weight_files(str(teacher / "transformer" if changed == "weights" else init))
            weights = load_file(file)
            save_file({k: v * 1.001 for k, v in weights.items()}, file)
        else:  # another beta schedule in the same directory
            path = teacher / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "beta_end": 0.013}))
        with pytest.raises(ConfigError) as err:
            trainer(2)
    finally:
        destroy_parallel()
    message = str(err.value)
    state = json.loads((out / "checkpoints" / "iter_0000001" / "trainer_state.json").read_text())
    key, what, named = {
        "weights": ("teacher", "the teacher's weights", f"model.teacher={str(teacher)!r}"),
        "schedule": ("schedule", "the noise schedule (scheduler/)", f"model.teacher={str(teacher)!r}"),
        "generator_init": ("generator_init", "the generator's initial weights (a LoRA generator's frozen base)",
                           f"model.generator_init={str(init)!r}")}[changed]
    assert "\n" not in message and message.startswith(
        f"{out / 'checkpoints' / 'iter_0000001' / 'trainer_state.json'}: the run was trained with {what} of "
        f"fingerprint {state['weights'][key][:12]}, {named} now has "), message
    assert message.endswith(" (its files changed since); a run cannot change them: restore them, or start a new run "
                            "(a new output_dir)"), message
    if changed == "weights":
        assert f" now has {transformer_fingerprint(str(teacher / 'transformer'))[:12]} (" in message


def test_a_full_generators_init_re_exported_in_place_does_not_stop_its_resume(cogvideox_pipeline, tmp_path):
    """A full (not LoRA) generator's model.generator_init is read at its first start only: its
    directory changed since (stage 1 exported again, in place) refused every requeue of stage 2,
    though the run's weights come from its checkpoints. It goes on, exactly as with the files it
    started from, and keeps recording the init it was trained from."""
    from safetensors.torch import save_file
    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import load_config
    from adm_megatron.models.diffusers_files import transformer_fingerprint, weight_files
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    init = shutil.copytree(cogvideox_pipeline + "/transformer", tmp_path / "init")
    first_init = transformer_fingerprint(str(init))

    def trainer(out, iterations: int) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={cogvideox_pipeline}", f"model.generator_init={init}",
                                          f"output_dir={out}", "train.save_every=1", *tiny_fp64_run(iterations)]))

    try:
        trainer(tmp_path / "whole", 2).fit()
        destroy_parallel()
        assert trainer(tmp_path / "run", 1).fit().trained == 1
        destroy_parallel()
        (file,) = weight_files(str(init))
        save_file({k: v * 1.001 for k, v in load_file(file).items()}, file)
        assert trainer(tmp_path / "run", 2).fit().trained == 1
    finally:
        destroy_parallel()
    assert [without_timing(r) for r in _metrics(tmp_path / "run")] == [without_timing(r)
                                                                       for r in _metrics(tmp_path / "whole")]
    state = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())
    assert state["weights"]["generator_init"] == first_init != transformer_fingerprint(str(init))


def test_a_lengthened_run_leaves_only_its_new_ends_export_and_samples(tmp_path, world_of_one):
    """The earlier end's generator/ (the run now ends without an export) and its end samples beyond
    the new end's are removed: the directory shows what this end wrote; the periodic samples stay."""
    from tiny_runs import tiny_fp64_run

    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"

    def fit(iterations: int, *extra: str):
        overrides = [f"model.teacher={pipeline_dir}", f"output_dir={out}", *tiny_fp64_run(iterations),
                     "model.dtype=fp32", "train.sample_every=1", *extra]
        return Trainer(load_config(None, overrides)).fit()

    fit(2, "train.export=true", "train.num_samples=2")
    assert (out / "generator" / "distillation.json").is_file()
    assert sorted(os.listdir(out / "samples")) == ["iter_0000001", "sample-000.gif", "sample-001.gif"]
    fit(3, "train.export=false", "train.num_samples=1")
    assert not (out / "generator").exists()
    assert sorted(os.listdir(out / "samples")) == ["iter_0000001", "sample-000.gif"]
