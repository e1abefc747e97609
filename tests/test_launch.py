"""``python -m adm_megatron.launch`` (torchrun as the sbatch scripts start it): a run stopped by a
signal the launcher passes on to its workers saves its checkpoint, and the launcher says so in one
line and exits 128 + the signal's number -- torchrun itself ended on a 28-line traceback there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_until_it_logs(tmp_path, launcher: list[str], *overrides: str):
    """A tiny CPU run started by ``python -m LAUNCHER... -m adm_megatron.cli train``, once it has
    written its first metrics: (the launcher's process, the run's output directory)."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    teacher = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", *launcher, "--master-port", str(free_port()), "-m", "adm_megatron.cli", "train",
           "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"model.teacher={teacher}",
           f"output_dir={out}", "train.max_iterations=100000", "train.num_samples=0", "logging.wandb_mode=disabled",
           "logging.progress=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(str(proc.communicate()))
        time.sleep(0.5)
    return proc, out


def test_a_signal_stop_under_the_launcher_is_one_line_after_the_workers_saved(tmp_path):
    proc, out = _train_until_it_logs(tmp_path, ["adm_megatron.launch", "--nproc-per-node", "2", "--signals-to-handle",
                                                "SIGTERM,SIGUSR1", "--shutdown-timeout", "300"], "data.batch_size=1")
    try:
        proc.send_signal(signal.SIGUSR1)  # as preemptible.sh forwards SLURM's time-limit warning
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert ("adm_megatron.launch: stopped by SIGUSR1: it was passed on to the workers, which have ended (a run saves "
            "a checkpoint first: checkpoints/latest names it)\n") in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert "run stopped by a signal after " in stdout and " iterations (" in stdout and latest.startswith("iter_")


def test_shutdown_timeout_is_taken_where_torchrun_does_not_know_it(monkeypatch):
    """torch 2.11's torchrun refused ``--shutdown-timeout`` (the sbatch scripts' command line
    failed there: "unrecognized arguments") and gave the workers a fixed 30 s; our launcher takes it
    on such a torch as the grace period of torchrun's process context. Older torch is stood in for
    by a parser without the flag."""
    import argparse
    import inspect

    from torch.distributed.elastic.multiprocessing.api import PContext

    from adm_megatron import launch

    def older_parser():  # torchrun's parser before the flag, cut down to what the command line below uses
        parser = argparse.ArgumentParser()
        parser.add_argument("--nproc-per-node")
        parser.add_argument("-m", "--module", action="store_true")
        parser.add_argument("training_script")
        parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
        return parser

    monkeypatch.setattr(launch, "get_args_parser", older_parser)
    monkeypatch.setattr(PContext.close, "__defaults__", PContext.close.__defaults__)  # restored after
    args = launch._parse(["--nproc-per-node", "2", "--shutdown-timeout", "600", "-m", "adm_megatron.cli", "train"])
    assert args.shutdown_timeout == 600 and args.module and args.training_script == "adm_megatron.cli"
    assert inspect.signature(PContext.close).parameters["timeout"].default == 600
    with pytest.raises(SystemExit):
        launch._parse(["--shutdown-timeout", "-1", "-m", "adm_megatron.cli"])
    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "90")  # torchrun's own flag reads it there too
    assert launch._parse(["-m", "adm_megatron.cli"]).shutdown_timeout == 90
    assert inspect.signature(PContext.close).parameters["timeout"].default == 90


def test_ranks_whose_torchrun_was_killed_save_and_stop(tmp_path):
    """SIGUSR1 to a bare torchrun (no --signals-to-handle) ends it at once, its default action; its
    workers, re-parented, trained on to the end with nobody to report to. They now see their
    parent change, save a checkpoint and stop as for a signal of their own."""
    proc, out = _train_until_it_logs(tmp_path, ["torch.distributed.run", "--nproc-per-node", "1"])
    try:
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == -signal.SIGUSR1  # torchrun is gone; the worker still holds the pipes
        stdout, stderr = proc.communicate(timeout=300)  # they close when the worker ends
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "has ended): saving a checkpoint, then exiting with 75" in stderr, stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert "run stopped by a signal after " in stdout and latest.startswith("iter_")
