"""One run at a time in an output directory (``adm_megatron/parallel/run_lock.py``): a run started into
an output_dir that another live run holds is refused in one line naming the holder, before it builds
any network and without writing anything; the lock goes with its holder's process (a killed holder
leaves a file that the next run takes again) and with the end of ``fit``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["data.num_prompts=4", "data.batch_size=2", "train.max_iterations=1", "train.num_samples=0",
       "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false"]
HOLD = ("import fcntl, sys, time\n"
        "f = open(sys.argv[1] + '/.run.lock', 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write('host h, pid 1, since then'); f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


def _command(pipeline_dir, out):
    return [sys.executable, "-m", "adm_megatron.cli", "train", "--config",
            os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), f"model.teacher={pipeline_dir}",
            f"output_dir={out}", *RUN]


def test_a_second_run_into_a_held_output_dir_is_refused_in_one_line_and_writes_nothing(pipeline_dir, tmp_path,
                                                                                        world_of_one, capsys):
    from adm_megatron.cli import main

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(_command(pipeline_dir, out)[3:]) == 2  # in this process: the lock is another process's
        err = capsys.readouterr().err
        # the refusal comes once the process group exists (so every rank gets it): after its log lines
        assert err.strip().splitlines()[-1] == (
            f"adm-megatron: config error: command line: output_dir={str(out)!r} is in use by another run (host h, "
            "pid 1, since then); wait for it to end, or use a new output_dir")
        assert "Traceback" not in err
        assert os.listdir(out) == [".run.lock"]  # no config.yaml, metrics or checkpoints of the second run
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its lock with it
        holder.wait()
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert "run finished: 1 iterations" in capsys.readouterr().out


def test_the_lock_is_held_while_a_trainer_lives_and_freed_when_fit_ends(pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.trainer import Trainer

    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                         [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path / 'run'}", *RUN])
    first = Trainer(config)
    with pytest.raises(ConfigError, match=rf"is in use by another run \(host .*, pid {os.getpid()}, since "):
        Trainer(config)
    first.fit()
    second = Trainer(config)  # the finished run: nothing to do, nothing locked
    assert second.fit().trained == 0
