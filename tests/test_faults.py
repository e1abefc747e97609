"""Faults a cluster run meets: a NaN in one rank's loss is skipped on every rank (an all-reduced
decision, so the data-parallel replicas never diverge), counted, and ``train.max_skipped_steps`` in
a row stop the run in one line with the last checkpoint intact; SIGTERM makes a run finish its
iteration, save and exit with code 75, and the same command goes on from there;
``train.save_interval_minutes`` saves by the clock; a rank that dies makes the others exit within
``parallel.timeout_s`` instead of hanging, and so does one that hangs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from multiproc import free_port, run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "data.num_prompts=4", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    "train.num_samples=0", "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]
NAN_ON_RANK1 = {1, 3, 4}  # iterations whose fake-score loss is NaN on rank 1 only


def _nan_in_one_rank(pipeline_dir: str, output_dir: str) -> dict:
    from adm_megatron.config import load_config
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *TINY,
                                "data.batch_size=1", "train.max_iterations=6", "train.save_every=1",
                                "train.nan_policy=skip", "train.max_skipped_steps=2"])
    trainer = Trainer(config)
    rank, now = trainer.info.rank, {}
    loss_fn, run_iteration = trainer.algorithm.fake_score_loss, trainer.train_iteration

    def fake_score_loss(*args):
        loss, metrics, extra = loss_fn(*args)
        if rank == 1 and now["iteration"] in NAN_ON_RANK1:
            loss = loss + float("nan")  # the loss is NaN, its gradient stays finite
        return loss, metrics, extra

    records = []

    def train_iteration(iteration):
        now["iteration"] = iteration
        metrics = run_iteration(iteration)
        weights = torch.cat([p.detach().flatten() for p in trainer.fake_score.parameters()]).clone()
        records.append((iteration, metrics["fake_score/skipped"], metrics["skipped_steps"], weights))
        return metrics

    trainer.algorithm.fake_score_loss = fake_score_loss
    trainer.train_iteration = train_iteration
    try:
        trainer.fit()
        error = None
    except NonFiniteError as err:
        error = str(err)
    return {"records": records, "error": error}


def test_nan_on_one_rank_is_skipped_on_all_and_k_in_a_row_stop_cleanly(tmp_path, world_of_one):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    ranks = run_world(_nan_in_one_rank, 2, pipeline_dir, str(out), timeout_s=600)
    for result in ranks:
        records = result["records"]
        assert [r[0] for r in records] == [0, 1, 2, 3]  # iteration 4 raised
        assert [r[1] for r in records] == [False, True, False, True]  # skipped on this rank too
        assert [r[2] for r in records] == [0, 1, 1, 2]  # the run's count of skipped updates
        weights = [r[3] for r in records]
        assert torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])
        error = result["error"]
        assert error is not None and "\n" not in error
        assert "iteration 4, phase fake_score: 2 fake_score updates in a row skipped" in error
        assert "train.max_skipped_steps=2" in error
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):
        assert torch.equal(a[3], b[3])  # the replicas stayed identical
    def strict(constant):  # what jq or JavaScript make of NaN / Infinity
        raise ValueError(f"metrics.jsonl: {constant} is not JSON")

    logged = [json.loads(line, parse_constant=strict) for line in open(out / "metrics.jsonl")]
    # the iteration that stopped the run has its record too: the phases it ran up to the stop
    assert [r["iteration"] for r in logged] == [0, 1, 2, 3, 4]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1, 2, 3]
    # the skipped updates' loss (NaN on rank 1, so in the mean) is written null
    assert [r["fake_score/loss"] is None for r in logged] == [False, True, False, True, True]
    assert logged[-1]["fake_score/grad_norm"] is None and "generator/loss" not in logged[-1]
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    assert checkpoints == [f"iter_{i:07d}" for i in range(1, 5)] + ["latest"]  # none half-written
    assert open(out / "checkpoints" / "latest").read().strip() == "iter_0000004"
    state = json.load(open(out / "checkpoints" / "iter_0000004" / "trainer_state.json"))
    assert state["iteration"] == 4
    assert not (out / "finished.json").exists()


def test_a_nan_stop_finishes_the_background_checkpoint_in_flight(tmp_path, world_of_one):
    """With train.async_save the stop threw away the checkpoint still being written (of the state
    before the NaN): no checkpoint was left at all, the run had to start over."""
    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={out}", *TINY, "data.batch_size=1",
                                "train.max_iterations=4", "train.save_every=2", "train.async_save=true"])
    trainer = Trainer(config)
    loss_fn, now = trainer.algorithm.fake_score_loss, {"iteration": 0}
    run_iteration = trainer.train_iteration

    def train_iteration(iteration):
        now["iteration"] = iteration
        return run_iteration(iteration)

    def fake_score_loss(*args):
        loss, metrics, extra = loss_fn(*args)
        return loss * (math.nan if now["iteration"] == 2 else 1.0), metrics, extra

    trainer.algorithm.fake_score_loss, trainer.train_iteration = fake_score_loss, train_iteration
    with pytest.raises(NonFiniteError, match="iteration 2, phase fake_score"):
        trainer.fit()
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000002", "latest"]
    assert open(out / "checkpoints" / "latest").read().strip() == "iter_0000002"
    assert Trainer(config).start_iteration == 2  # a whole checkpoint: the run goes on from it


def _nan_in_one_tp_ranks_duplicate(pipeline_dir: str, output_dir: str) -> list:
    """TP = 2: at iteration 1 the fake score's gradient of a TP-duplicated parameter (a layer norm,
    an embedding: whole on every TP rank) is NaN on TP rank 1 only."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from adm_megatron.config import load_config
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *TINY,
                                         "data.batch_size=2", "parallel.tensor_parallel=2",
                                         "train.max_iterations=3", "train.nan_policy=skip"]))
    optimizer, rank = trainer.trainable["fake_score"].optimizer, trainer.info.rank
    duplicates = [s for s in optimizer.main.slots if not param_is_not_tensor_parallel_duplicate(s.param)]
    assert bool(duplicates) == (rank == 1)
    checked_norm, now, records = optimizer.checked_norm, {}, []

    def faulty_norm():  # the gradients as the update reads them
        if rank == 1 and now["iteration"] == 1:
            optimizer.main.grad(duplicates[0]).fill_(float("nan"))
        return checked_norm()

    optimizer.checked_norm = faulty_norm
    for iteration in range(3):
        now["iteration"] = iteration
        metrics = trainer.train_iteration(iteration)
        finite = all(bool(p.isfinite().all()) for p in trainer.fake_score.parameters())
        records.append((metrics["fake_score/skipped"], metrics["fake_score/loss"], finite))
    return records


@pytest.mark.slow
def test_a_nan_gradient_in_one_tp_ranks_duplicate_is_skipped_on_both(tmp_path, world_of_one):
    """It was stepped into rank 1's copy unseen (a finite norm reported): rank 1's weights went NaN,
    rank 0's not, and the next iteration's losses were NaN on both."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    ranks = run_world(_nan_in_one_tp_ranks_duplicate, 2, pipeline_dir, str(tmp_path / "run"), timeout_s=600)
    for records in ranks:
        assert [r[0] for r in records] == [False, True, False]  # skipped on both TP ranks
        assert all(r[2] and math.isfinite(r[1]) for r in records)  # the weights and losses stay finite
    assert ranks[0] == ranks[1]


def _command(pipeline_dir, out, *extra):
    return [sys.executable, "-m", "adm_megatron.cli", "train", "--config",
            os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"model.teacher={pipeline_dir}",
            f"output_dir={out}", "data.batch_size=1", "train.num_samples=0", "logging.wandb_mode=disabled",
            "logging.progress=false", *extra]


def _wait_for_lines(path, count, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not (os.path.isfile(path) and len(open(path).readlines()) >= count):
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline
        time.sleep(0.02)


# the fast suite: one plain stop (test_slurm.py's stop signal to every process of a step covers a background
# save with SIGUSR1 to the writer's processes too)
@pytest.mark.parametrize("saving, signum, group", [
    ([], signal.SIGTERM, False), pytest.param(["train.async_save=true"], signal.SIGTERM, False, marks=pytest.mark.slow),
    pytest.param([], signal.SIGUSR1, True, marks=pytest.mark.slow),
    pytest.param(["train.async_save=true"], signal.SIGUSR1, True, marks=pytest.mark.slow),
    pytest.param([], signal.SIGTERM, True, marks=pytest.mark.slow),
], ids=["synchronous, SIGTERM to the trainer", "background, SIGTERM to the trainer",
        "synchronous, SIGUSR1 to its process group", "background, SIGUSR1 to its process group",
        "synchronous, SIGTERM to its process group"])
def test_a_stop_signal_saves_after_the_iteration_exits_75_and_the_same_command_goes_on(saving, signum, group, tmp_path,
                                                                                      world_of_one):
    """In the background too: the stop waits for the save in flight, then writes its own. A signal
    to the whole process group (SLURM signals every process of a step, ``kill -- -PGID``, a
    launcher's shutdown) also reaches the checkpoint writer's helper processes, which must outlive
    it: they served every save after the first, and the stop's own save went through a dead one."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    # no save_every: every checkpoint before the signal is a time-based one (every ~6 ms)
    cmd = _command(pipeline_dir, out, "train.max_iterations=8", "train.save_every=0",
                   "train.save_interval_minutes=0.0001", *saving)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_lines(out / "metrics.jsonl", 2, proc)  # a checkpoint is written after each iteration
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    logged = [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")]
    stopped = logged[-1] + 1  # it finished the iteration it was in, and did no other
    assert logged == list(range(stopped)) and stopped < 8
    assert f"run stopped by a signal after {stopped} iterations" in stdout
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == [f"iter_{i:07d}" for i in range(1, stopped + 1)] + ["latest"]
    assert open(out / "checkpoints" / "latest").read().strip() == f"iter_{stopped:07d}"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run finished: 8 iterations ({8 - stopped} trained now)" in again.stdout
    assert [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")] == list(range(8))


@pytest.mark.parametrize("fault", [
    signal.SIGKILL,
    pytest.param(signal.SIGSTOP, marks=pytest.mark.slow),  # waits out parallel.timeout_s
], ids=["rank dies", "rank hangs"])
def test_a_dead_or_hung_rank_makes_the_other_exit_within_the_timeout(fault, tmp_path, world_of_one):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    timeout_s = 15
    cmd = _command(pipeline_dir, out, "train.max_iterations=1000", f"parallel.timeout_s={timeout_s}")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_lines(out / "metrics.jsonl", 2, procs[0])
        procs[1].send_signal(fault)
        stopped = time.monotonic()
        procs[0].wait(timeout=timeout_s + 60)  # (a hang here fails the test)
        waited = time.monotonic() - stopped
        stderr = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()
    assert procs[0].returncode != 0, stderr[-2000:]
    assert waited <= timeout_s + 15, (waited, stderr[-2000:])


def test_a_full_checkpoint_disk_stops_the_run_in_one_line_before_writing(tmp_path, world_of_one, monkeypatch, capsys):
    """A save that ran out of space failed inside megatron-core on the rank that hit it alone (the
    others waited for it until parallel.timeout_s), and a failed save's error came out of train as
    a traceback: with less room than the latest checkpoint took, the next save is refused on every
    rank before anything is written, and train stops in one line with exit status 1."""
    import shutil as shutil_module

    from adm_megatron.cli import main
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    full = shutil_module.disk_usage(str(tmp_path))._replace(free=2**20)
    monkeypatch.setattr("adm_megatron.train.checkpoint.shutil.disk_usage", lambda path: full)
    capsys.readouterr()
    rc = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"model.teacher={pipeline_dir}",
               f"output_dir={out}", "data.batch_size=1", "train.num_samples=0", "logging.wandb_mode=disabled",
               "logging.progress=false", "train.max_iterations=3", "train.save_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err[-5:]
    assert err[-1].startswith(f"adm-megatron: training stopped: {out}/checkpoints: 1.00 MiB free, less than the ")
    assert err[-1].endswith(" MiB iter_0000001 took; nothing was written and iter_0000001 stays the latest (free "
                            "space, or keep fewer with train.keep_checkpoints)")  # a small run's sizes: in MiB
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000001", "latest"]


def _signal_while_rank0_starts_logging(pipeline_dir: str, output_dir: str) -> tuple[bool, int]:
    """A stop signal to every rank while rank 0 starts its logger (wandb's start takes seconds)."""
    from adm_megatron.config import load_config
    from adm_megatron.train import trainer as trainer_module

    class SignalledLogger(trainer_module.RunLogger):
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            super().__init__(*args, **kwargs)

    trainer_module.RunLogger = SignalledLogger
    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), [
        f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", "data.batch_size=1", "train.max_iterations=4",
        "train.num_samples=0", "logging.wandb_mode=disabled", "logging.progress=false"])
    result = trainer_module.Trainer(config).fit()
    return result.preempted, result.iterations


def test_a_stop_signal_while_the_run_starts_its_logging_stops_after_one_iteration(cogvideox_pipeline, tmp_path):
    # the default SIGTERM action killed the rank in its logger's start (the other ranks then died in a collective)
    results = run_world(_signal_while_rank0_starts_logging, 2, cogvideox_pipeline, str(tmp_path / "run"), timeout_s=120)
    assert results == [(True, 1), (True, 1)]
    with open(tmp_path / "run" / "checkpoints" / "latest") as f:
        assert f.read().strip() == "iter_0000001"


@pytest.mark.parametrize("rank, said", [(0, 1), (1, 0)])
def test_a_stop_is_announced_by_rank_0_only(rank, said, monkeypatch, caplog):
    """Every rank logged "stop requested (SIGUSR1)" at WARNING (which non-zero ranks show): one line
    per GPU in a SLURM job's log at each time-limit stop."""
    import logging

    import torch.distributed as dist

    from adm_megatron.train.preemption import StopPoll

    for name, value in {"is_initialized": lambda: True, "get_world_size": lambda: 2, "get_rank": lambda: rank,
                        "get_backend": lambda: "gloo", "all_reduce": lambda *a, **k: None}.items():
        monkeypatch.setattr(dist, name, value)
    poll = StopPoll()
    try:
        poll.signal = signal.SIGUSR1
        with caplog.at_level(logging.INFO, logger="adm_megatron"):
            assert poll.poll() == (True, False)
    finally:
        poll.close()
    assert sum("stop requested (SIGUSR1)" in r.getMessage() for r in caplog.records) == said


def test_ctrl_c_stops_with_a_checkpoint_and_twice_at_once():
    """Ctrl-C (SIGINT) during training was a KeyboardInterrupt traceback (exit 130) that lost the
    checkpoint being written; it is now a stop like SIGTERM's (save, exit 75), and a second Ctrl-C
    ends the process at once."""
    from adm_megatron.train.preemption import StopPoll

    poll = StopPoll()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert poll.poll() == (True, False) and poll.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        poll.close()


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_a_nan_stop_is_said_by_rank_0_only(rank, lines, monkeypatch, capsys):
    """The NaN / Inf stop is decided alike on every rank (all-reduced), and every rank printed its
    "training stopped" line: one per GPU in a SLURM job's log. Rank 0 says it; all exit 3."""
    from adm_megatron import cli
    from adm_megatron.train import trainer
    from adm_megatron.train.phases import NonFiniteError

    class Stops:
        def __init__(self, config):
            pass

        def fit(self):
            raise NonFiniteError("iteration 0, phase generator: loss is nan on this or another rank")

    monkeypatch.setattr(trainer, "Trainer", Stops)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli._train(cli.build_parser().parse_args(
        ["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml")]))
    assert code == 3 and capsys.readouterr().err.count("training stopped: iteration 0") == lines


def test_a_stop_signal_during_the_start_up_exits_75_in_one_line_having_written_nothing(tmp_path, monkeypatch,
                                                                                      capsys):
    """SIGTERM / SIGUSR1 before the training loop's handler exists (here while the resume is planned,
    a point of a start-up that takes minutes for a large model): the command ends at once with the
    preemption's exit code and one line, the output directory untouched, the handlers as they were."""
    import adm_megatron.train.trainer as trainer_module
    from adm_megatron.cli import main
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    planned = trainer_module.plan_resume
    # wrapped: the signal lands in code that re-raises what it meets as an error of its own -- diffusers'
    # lazy importer (RuntimeError("Failed to import ...") from it, under torchrun a common moment) and our
    # checkpoint-metadata reader (a CheckpointError, exit 1) catch Exception, which the stop now passes;
    # code that catches everything still wraps it
    for sent, catches in ((signal.SIGTERM, None), (signal.SIGUSR1, None), (signal.SIGTERM, Exception),
                          (signal.SIGTERM, BaseException)):
        def signalled(*args, sent=sent, catches=catches, **kwargs):
            try:
                os.kill(os.getpid(), sent)
            except catches or () as error:
                raise RuntimeError(f"Failed to import diffusers.models because of: {error}") from error
            return planned(*args, **kwargs)

        monkeypatch.setattr(trainer_module, "plan_resume", signalled)
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        out = tmp_path / f"run_{sent.name}_{catches and catches.__name__}"
        rc = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                   f"model.teacher={pipeline_dir}", f"output_dir={out}", "logging.wandb_mode=disabled",
                   "logging.progress=false"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 75 and err[-1] == (
            f"adm-megatron: stopped by {sent.name} during the start-up, before training; nothing new to save: run "
            "the same command to go on"), err[-3:]
        assert not out.exists() or os.listdir(out) == []
        assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("part", ["generator", "train_state"])
def test_a_stop_signal_while_the_checkpoint_loads_exits_75_not_as_a_damaged_checkpoint(part, tmp_path, monkeypatch,
                                                                                      capsys):
    """A stop while the resume reads the checkpoint: torch DCP gathers every rank's exception, the
    stop's included, into its CheckpointException, which read as a failed load (exit 1, "loading
    failed (rank 0: StartupStop ...)", after scanning every shard file for damage), or, in the
    training state's load, a traceback."""
    import torch.distributed.checkpoint.filesystem as dcp_files

    from adm_megatron.cli import main
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    run = ["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
           f"model.teacher={build_tiny_pipeline(str(tmp_path / 'pipe'), seed=0)}", f"output_dir={tmp_path / 'run'}",
           "logging.wandb_mode=disabled", "logging.progress=false", "train.num_samples=0", "train.export=false"]
    assert main([*run, "train.max_iterations=1"]) == 0
    read = dcp_files.FileSystemReader.read_data

    def signalled(self, *args, **kwargs):
        if str(self.path).endswith(part):
            os.kill(os.getpid(), signal.SIGUSR1)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(dcp_files.FileSystemReader, "read_data", signalled)
    capsys.readouterr()
    assert main([*run, "train.max_iterations=3"]) == 75
    assert capsys.readouterr().err.strip().splitlines()[-1] == STOPPED_IN_STARTUP


STOPPED_IN_STARTUP = ("adm-megatron: stopped by SIGUSR1 during the start-up, before training; nothing new to save: run "
                      "the same command to go on")


def test_a_stop_signal_while_the_config_loads_exits_75_in_one_line(tmp_path, monkeypatch, capsys):
    """The handler was installed only after the trainer's imports and the config (seconds on a loaded
    node): a stop signal in that window killed the process silently (exit 138). As the process's own
    command, a stopped one ignores further stop signals to its end (SLURM's TERM, then the batch
    shell's USR1, killed it mid-exit)."""
    from adm_megatron import cli

    loaded = cli.load_config

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return loaded(*args, **kwargs)

    monkeypatch.setattr(cli, "load_config", signalled)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(sys, "argv", ["adm-megatron", "train", "--config",
                                      os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"output_dir={tmp_path}"])
    try:
        assert cli.main() == 75
        assert {s: signal.getsignal(s) for s in before} == {s: signal.SIG_IGN for s in before}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert capsys.readouterr().err.strip() == STOPPED_IN_STARTUP


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finalizer's stop
def test_a_start_up_stop_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """A stop signal handled inside a ``__del__`` (Python prints the finalizer's exception and drops
    it): the start-up went on and the run trained to its end, its stop lost. The stop stays pending
    and the first poll stops the run with a checkpoint."""
    import adm_megatron.train.trainer as trainer_module
    from adm_megatron.cli import main
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    class SignalsWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGUSR1)

    planned = trainer_module.plan_resume

    def signalled(*args, **kwargs):
        SignalsWhenFreed()  # freed at once: the stop is raised inside its finalizer
        return planned(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "plan_resume", signalled)
    out = tmp_path / "run"
    rc = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
               f"model.teacher={build_tiny_pipeline(str(tmp_path / 'pipe'), seed=0)}", f"output_dir={out}",
               "train.max_iterations=5", "logging.wandb_mode=disabled", "logging.progress=false"])
    captured = capsys.readouterr()
    assert rc == 75 and "run stopped by a signal after 1 iterations" in captured.out, captured.out
    assert os.path.isdir(out / "checkpoints" / "iter_0000001")


def _trainer_stopped_then(monkeypatch, then):
    """cli's Trainer replaced by one whose fit() gets SIGUSR1 while training, then runs ``then()``."""
    from adm_megatron.train import trainer
    from adm_megatron.train.preemption import StopPoll

    class Stopped:
        def __init__(self, config):
            pass

        def fit(self):
            poll = StopPoll()
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                return then()
            finally:
                poll.close()

    monkeypatch.setattr(trainer, "Trainer", Stopped)


def test_an_error_after_a_stop_signal_exits_75_in_one_line(monkeypatch, capsys):
    """This rank got the stop while training, and its next collective failed because another rank had
    already ended (stopped during its own start-up): a gloo traceback, exit 1. It is the stop's end."""
    from adm_megatron import cli

    def peer_gone():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:29500\nmore")

    _trainer_stopped_then(monkeypatch, peer_gone)
    assert cli.main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml")]) == 75
    assert capsys.readouterr().err.strip() == (
        "adm-megatron: stopped by SIGUSR1, then ended by RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:"
        "534] Connection closed by peer [127.0.0.1]:29500 (another rank ended first); run the same command to go on "
        "from the latest checkpoint")


def test_a_stop_signal_after_the_training_loop_lets_the_finished_run_end(monkeypatch, capsys):
    """A stop that comes once the training loop's handler is gone (the run writing finished.json, its
    last lines): the start-up's handler, back in place, took it for a start-up stop -- "during the
    start-up, before training", exit 75 for a finished run. It is ignored: the run ends as finished."""
    from types import SimpleNamespace

    from adm_megatron import cli
    from adm_megatron.train import trainer
    from adm_megatron.train.preemption import StopPoll

    class StoppedWhileFinishing:
        def __init__(self, config):
            pass

        def fit(self):
            StopPoll().close()  # the training loop
            os.kill(os.getpid(), signal.SIGTERM)
            return SimpleNamespace(preempted=False, iterations=3, trained=3, output_dir="out", generator_dir=None,
                                   samples=[])

    monkeypatch.setattr(trainer, "Trainer", StoppedWhileFinishing)
    assert cli.main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "run finished: 3 iterations (3 trained now), outputs in out"


def test_a_bug_met_after_a_stop_signal_is_still_a_traceback(monkeypatch):
    """Only a collective's failure after a stop is the stop's end: any other error (a bug in the
    save the stop started) was printed as a preemption, exit 75, and the job requeued over it."""
    from adm_megatron import cli

    _trainer_stopped_then(monkeypatch, lambda: None.save())
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'save'"):
        cli.main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml")])
