"""The sbatch scripts on a real single-node SLURM (slurm-wlm + munge, installed and started by
``slurm_local``). The tiny training script: a 2-task job gets SIGUSR1 in its batch shell mid-run (as
``--signal=B:USR1@N`` sends it), forwards it, every rank saves and exits 75, the job requeues itself,
starts again (``SLURM_RESTART_COUNT=1``), resumes from that checkpoint, does only the remaining
iterations and ends with the metrics of an uninterrupted 2-task job, bit for bit; a SIGUSR1 to
every process of the step (scancel without --batch) makes every rank save and exit 75. The sampling
script: 2 tasks split a prompt file and write the files one process writes. ``preemptible.sh`` alone
(a stub ``scontrol``): a step that finished despite the time-limit warning is not requeued."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from slurm_local import LocalSlurm
from tiny_runs import without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "slurm", "tiny_cpu.sbatch")
# the signal goes out after 2 iterations; the other 10 are the margin for its way through scancel,
# slurmctld, slurmd, the batch shell and srun, which took more than 4 iterations' time on a loaded
# machine (the step then finished the run first and exited 0)
ITERATIONS = 12
WAIT_S = 900  # per step; about 30 s each on 2 idle cores, far more on a loaded machine


def _args(pipeline_dir: str, out: str) -> list[str]:
    return [os.path.join(ROOT, "examples", "cogvideox", "tiny_cpu.yaml"), f"model.teacher={pipeline_dir}",
            f"output_dir={out}", f"train.max_iterations={ITERATIONS}", "data.batch_size=1",
            "train.num_samples=0", "logging.wandb_mode=disabled", "logging.progress=false"]


def _metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def _without_timings(rows: list[dict]) -> list[dict]:
    return [without_timing(r) for r in rows]


def _ended(slurm, job: str) -> bool:
    return slurm.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.mark.timeout(2400)  # about a minute on 2 quiet cores; several when the machine is shared
def test_tiny_sbatch_job_is_preempted_requeued_and_resumes_exactly(tmp_path):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    env = {"PYTHON": sys.executable, "ADM_MEGATRON_ROOT": ROOT}
    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "preempted")
    ref_log, log = str(tmp_path / "reference.log"), str(tmp_path / "preempted.log")
    with LocalSlurm(str(tmp_path / "slurm")) as slurm:
        job = slurm.sbatch(["--output", log, SCRIPT, *_args(pipeline_dir, out)], cwd=ROOT, env=env)
        slurm.wait(lambda: len(_metrics(out)) >= 2, WAIT_S, "two iterations of the job")
        slurm.scancel("--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 does at the time limit
        slurm.wait(lambda: slurm.job(job).get("Restarts") == "1", WAIT_S, "the job to requeue itself")
        # a requeue holds the job for the credential lifetime (slurm_local.CRED_EXPIRE_S, 10 s here,
        # 120 s by default); releasing it earlier races slurmd's "Job credential revoked", so it
        # starts again by itself
        slurm.wait(lambda: _ended(slurm, job), WAIT_S, "the resumed job to finish")
        assert slurm.job(job)["JobState"] == "COMPLETED", slurm.job(job)
        # the uninterrupted reference: the same script and arguments, no signal
        reference = slurm.sbatch(["--output", ref_log, SCRIPT, *_args(pipeline_dir, ref_out)], cwd=ROOT, env=env)
        slurm.wait(lambda: slurm.job(reference).get("JobState") == "COMPLETED", WAIT_S, "the reference job")
        restarts = slurm.job(job)["Restarts"]

    text = open(log).read()
    assert restarts == "1"
    assert "start 0 on" in text and "start 1 on" in text  # SLURM_RESTART_COUNT of the two starts
    assert "stop signal: forwarding SIGUSR1 to the training step" in text
    assert "training step stopped after saving a checkpoint (exit 75)" in text and f"requeueing job {job}" in text
    stopped = int(re.search(r"run stopped by a signal after (\d+) iterations", text).group(1))
    assert 2 <= stopped < ITERATIONS
    assert f"resumed from {out}/checkpoints/iter_{stopped:07d}:" in text
    assert f"run finished: {ITERATIONS} iterations ({ITERATIONS - stopped} trained now)" in text
    rows, ref_rows = _metrics(out), _metrics(ref_out)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert _without_timings(rows) == _without_timings(ref_rows)


@pytest.mark.timeout(2400)
def test_a_stop_signal_to_every_process_of_the_step_saves_and_exits_75(tmp_path):
    """``scancel -s USR1 JOB`` (no ``--batch``) signals every process of the step: each rank and
    the checkpoint writer's helper processes, which died of it, so the stop's save failed (a broken
    pipe; both ranks crashed with background saves). Now every rank saves and exits 75 (the batch
    shell got no signal: no requeue)."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    out, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    args = [*_args(pipeline_dir, out), "train.save_every=1", "train.async_save=true"]
    with LocalSlurm(str(tmp_path / "slurm")) as slurm:
        job = slurm.sbatch(["--output", log, SCRIPT, *args], cwd=ROOT, env={"PYTHON": sys.executable,
                                                                            "ADM_MEGATRON_ROOT": ROOT})
        # checkpoints written after each iteration: the writer's helper processes exist by then
        slurm.wait(lambda: len(_metrics(out)) >= 2, WAIT_S, "two iterations of the job")
        slurm.scancel("--signal=USR1", job)
        slurm.wait(lambda: _ended(slurm, job), WAIT_S, "the job to end")
        restarts = slurm.job(job)["Restarts"]
    text = open(log).read()
    assert "training step stopped after saving a checkpoint (exit 75)" in text, text[-3000:]
    stopped = int(re.search(r"run stopped by a signal after (\d+) iterations", text).group(1))
    assert stopped < ITERATIONS and restarts == "0"
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == f"iter_{stopped:07d}"


@pytest.mark.timeout(1200)
def test_sample_sbatch_splits_the_prompts_over_its_tasks(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    pipeline = build_tiny_sd3_pipeline(str(tmp_path / "pipe"), seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\nblue sky\na cat\n")
    args = ["--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--steps", "2", "--teacher-steps", "0",
            "--prompt-file", str(prompts)]
    log = str(tmp_path / "sample.log")
    with LocalSlurm(str(tmp_path / "slurm")) as slurm:
        job = slurm.sbatch(["--ntasks", "2", "--output", log, os.path.join(ROOT, "examples", "slurm", "sample.sbatch"),
                            *args, "--out", str(tmp_path / "slurm_out")], cwd=str(tmp_path), env={"PYTHON": sys.executable})
        slurm.wait(lambda: _ended(slurm, job), WAIT_S, "the sampling job")
        assert slurm.job(job)["JobState"] == "COMPLETED", open(log).read()[-3000:]
    single = subprocess.run([sys.executable, "-m", "adm_megatron.cli", "sample", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    text = open(log).read()
    assert "2 task(s) on" in text and "2 process(es)" in text
    names = sorted(os.listdir(tmp_path / "one" / "generator"))
    assert names == ["grid.png", "sample-000.png", "sample-001.png", "sample-002.png"]
    assert sorted(os.listdir(tmp_path / "slurm_out" / "generator")) == names
    for name in names:
        assert np.array_equal(iio.imread(tmp_path / "slurm_out" / "generator" / name),
                              iio.imread(tmp_path / "one" / "generator" / name)), name
    assert json.loads((tmp_path / "slurm_out" / "sample_timing.json").read_text())["ranks"] == 2


def _stub(tmp_path, command: str, calls) -> str:
    """A directory to put first on PATH, where ``command`` only appends its arguments to ``calls``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / command).write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / command).chmod(0o755)
    return str(bin_dir)


def _preemptible(tmp_path, step: str, signals: str = "kill -USR1 $$") -> tuple[str, str]:
    """``run_preemptible`` on ``bash -c STEP`` in a batch shell that gets ``signals`` (by default
    SIGUSR1, the time-limit warning) once the step has written ``$READY``; ``scontrol`` is a stub
    that records its arguments. No SLURM needed."""
    calls, ready = tmp_path / "scontrol.calls", tmp_path / "ready"
    bin_dir = _stub(tmp_path, "scontrol", calls)
    shell = (f"source {os.path.join(ROOT, 'examples', 'slurm', 'preemptible.sh')}; "
             f"(while [ ! -e {ready} ]; do sleep 0.1; done; {signals}) & run_preemptible bash -c {step!r}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", READY=str(ready))
    proc = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
    return proc.stdout, calls.read_text() if calls.exists() else ""


def test_preemptible_requeues_a_stopped_step_but_not_one_that_finished(tmp_path):
    """The time-limit warning that came during a run's last iterations: the step finished (exit 0)
    and the job was requeued anyway, a whole new start (queue wait, loading) that only found the
    run finished. A step that stopped (75) is requeued."""
    out, calls = _preemptible(tmp_path / "stopped", 'trap "exit 75" USR1; touch $READY; sleep 9 >/dev/null 2>&1 & wait $!')
    assert "stopped after saving a checkpoint (exit 75)" in out and calls == "requeue 4242\n", out
    out, calls = _preemptible(tmp_path / "finished", 'trap "" USR1; touch $READY; sleep 1; exit 0')
    assert "stop signal: forwarding SIGUSR1" in out and "training step done" in out, out
    assert "requeueing" not in out and calls == "", out


@pytest.mark.parametrize("reason, requeued", [("None", False), ("TimeLimit", True)], ids=["scancel", "time-limit"])
def test_preemptible_requeues_after_the_warning_unless_the_job_was_cancelled(reason, requeued, tmp_path):
    """A SIGTERM while the step saved for the time-limit warning: scancel's (squeue's reason None) --
    the job the user had just cancelled was requeued (the warning's requeue stood) -- stays
    cancelled; the time limit's own (reason TimeLimit: a save longer than the warning's lead time,
    which SLURM gives KillWait seconds more) is requeued, as seen on a real slurm-wlm 22.05."""
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir(parents=True)
    squeue.write_text(f'#!/bin/sh\n[ "$*" = "-h -j 4242 -o %r" ] && echo {reason}\n')
    squeue.chmod(0o755)
    out, calls = _preemptible(tmp_path, 'trap "sleep 1; exit 75" USR1; touch $READY; sleep 9 >/dev/null 2>&1 & wait $!',
                              "kill -USR1 $$; sleep 0.3; kill -TERM $$")
    assert "stop signal: forwarding SIGUSR1" in out and "SIGTERM: forwarding SIGUSR1" in out, out
    assert "stopped after saving a checkpoint (exit 75)" in out, out
    assert (calls == "requeue 4242\n") == requeued and ("requeueing" in out) == requeued, out


def test_sample_sbatch_runs_without_ntasks(tmp_path):
    """``sbatch examples/slurm/sample.sbatch ...`` without --ntasks (one GPU, one task): the job has no
    SLURM_NTASKS and the script failed at once with "SLURM_NTASKS: unbound variable" (set -u)."""
    calls = tmp_path / "srun.calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{_stub(tmp_path, 'srun', calls)}:{env['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
               PYTHON="py")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", "sample.sbatch"), "--out", "o"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "job 7 start 0: 1 task(s) on n1" in proc.stdout, proc.stderr
    assert calls.read_text() == "py -m adm_megatron.cli sample --out o\n"


@pytest.mark.parametrize("script", ["tiny_cpu.sbatch", "train.sbatch"])
def test_a_job_submitted_away_from_the_repository_says_so_in_one_line(script, tmp_path):
    """Submitted from another directory without ADM_MEGATRON_ROOT, the script went on past the failed
    ``source`` and ended on "run_preemptible: command not found" (exit 127)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "ADM_MEGATRON_ROOT"}
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", script), "config.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr == (f"{script}: {tmp_path}/examples/slurm/preemptible.sh not found: submit from the "
                           "repository root or set ADM_MEGATRON_ROOT\n")


@pytest.mark.parametrize("gpus, procs, started, warned", [("4", "", "4", False), ("", "2", "2", False),
                                                           ("", "", "8", True)])
def test_train_sbatch_starts_a_process_per_gpu_or_as_told(gpus, procs, started, warned, tmp_path):
    """On a node SLURM gave no GPUs (a CPU test) train.sbatch started 8 ranks without a word; it now
    takes PROCS_PER_NODE there, and says so when it falls back to 8."""
    calls = tmp_path / "srun.calls"
    bin_dir = _stub(tmp_path, "srun", calls)
    _stub(tmp_path, "scontrol", tmp_path / "scontrol.calls")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PROCS_PER_NODE"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", ADM_MEGATRON_ROOT=ROOT, SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", **({"SLURM_GPUS_ON_NODE": gpus} if gpus else {}),
               **({"PROCS_PER_NODE": procs} if procs else {}))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", "train.sbatch"), "config.yaml"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and f"--nproc-per-node {started} " in calls.read_text(), proc
    assert ("PROCS_PER_NODE is unset: starting 8 processes per node" in proc.stderr) == warned, proc.stderr


def test_every_sbatch_script_appends_its_log_across_requeues():
    """sample.sbatch's log was opened anew (SLURM's default, truncate) when the job was requeued:
    the first start's lines, its progress and why it stopped, were gone."""
    folder = os.path.join(ROOT, "examples", "slurm")
    scripts = sorted(name for name in os.listdir(folder) if name.endswith(".sbatch"))
    assert scripts == ["sample.sbatch", "tiny_cpu.sbatch", "train.sbatch"]
    for name in scripts:
        options = [line.split()[1] for line in open(os.path.join(folder, name)) if line.startswith("#SBATCH")]
        assert "--open-mode=append" in options, name
