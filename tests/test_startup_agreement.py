"""A start-up failure that only some ranks of a launch hit (a path one node lacks) stops every rank
at once with one line, said by the rank that failed (adm_megatron/parallel/startup.py): the ranks
that passed no longer wait ``parallel.timeout_s`` in the rendezvous for it and then die with a
store-timeout traceback. One that every rank hits is said once."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time

from multiproc import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFUSED = "adm-megatron: config error: command line: "  # the keys below are given as overrides


def _cli_rank(teachers: list[str], out: str) -> tuple[int, str, float]:
    """``adm-megatron train`` on this rank with its own ``model.teacher``: (exit code, stderr, seconds)."""
    from adm_megatron.cli import main

    rank = int(os.environ["RANK"])
    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                     f"model.teacher={teachers[rank]}", f"output_dir={out}", "parallel.timeout_s=300",
                     "data.batch_size=1", "train.max_iterations=1", "logging.wandb_mode=disabled"])
    said = [line for line in err.getvalue().splitlines() if not line.startswith("[")]  # not the log's lines
    return code, said, time.monotonic() - start


def test_a_path_one_rank_lacks_stops_every_rank_with_one_line(cogvideox_pipeline, tmp_path):
    missing = str(tmp_path / "not-on-this-node")
    results = run_world(_cli_rank, 2, [cogvideox_pipeline, missing], str(tmp_path / "run"), timeout_s=120)
    (code0, err0, seconds0), (code1, err1, _) = results
    assert (code0, code1) == (2, 2)
    assert err0 == []  # rank 0 passed: rank 1 says why
    assert err1 == [f"{REFUSED}model.teacher={missing!r}: directory not found "
                    f"(on rank 1 of 2, host {os.uname().nodename}; the other ranks passed this check)"]
    assert seconds0 < 100  # not parallel.timeout_s
    assert not os.path.exists(tmp_path / "run")


def test_a_failure_every_rank_hits_is_said_once(tmp_path):
    missing = str(tmp_path / "nowhere")
    results = run_world(_cli_rank, 2, [missing, missing], str(tmp_path / "run"), timeout_s=120)
    assert [code for code, _, _ in results] == [2, 2]
    assert results[0][1] == [f"{REFUSED}model.teacher={missing!r}: directory not found"]
    assert results[1][1] == []


def _cli(argv: list[str]) -> tuple[int, list[str]]:
    from adm_megatron.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_plan_bench_and_export_refuse_a_multi_process_launch_in_one_line(tmp_path):
    # bench under torchrun crashed (every rank's checkpoint timing in its own temporary run directory);
    # plan printed its table once per rank; export's ranks each resolved a live run's checkpoints/latest
    # (a save between their reads: two checkpoints) and wrote the same directory
    out = str(tmp_path / "bench.json")
    config = os.path.join(ROOT, "examples/cogvideox/cogvideox_2b_8step.yaml")
    for argv, what in ((["plan", "--config", config, "--arch", "cogvideox-2b", "--gpus", "8", "--card", "80"],
                        "--gpus says"),
                       (["bench", "--model", "cogvideox-2b", "--layers", "1", "--out", out], "it times one"),
                       (["export", "--checkpoint", str(tmp_path / "run"), "--out", out], "writes one directory")):
        results = run_world(_cli, 2, argv, timeout_s=120)
        assert [code for code, _ in results] == [2, 2]
        assert results[1][1] == []
        (line,) = results[0][1]
        assert line.startswith(f"adm-megatron: config error: {argv[0]} runs in one process, not under torchrun / "
                               "srun (this launch started 2)") and what in line
    assert not os.path.exists(out)


def test_a_multi_process_command_in_the_batch_script_of_a_multi_task_job_is_refused_in_one_line(monkeypatch, tmp_path):
    # the batch script of `sbatch --ntasks=2` has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step id:
    # `adm-megatron train` run there without srun took itself for rank 0 of 2 and waited for a rank 1
    # nobody starts (parallel.timeout_s, 600 s, then a traceback)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_JOB_ID": "5419", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "vm"}.items():
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "out")
    config = os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml")
    for argv in (["train", "--config", config, f"output_dir={out}", "parallel.timeout_s=5"],
                 ["collect-ode", "--config", config, "--out", out, "--num-pairs", "2"],
                 ["sample", "--pipeline", "p", "--generator", "g", "--prompt", "x", "--out", out]):
        code, said = _cli(argv)
        assert code == 2 and said == [
            f"adm-megatron: config error: {argv[0]}: started by the batch script of SLURM job 5419, which asked for 2 "
            f"tasks, not by srun: start one process per task with `srun python -m adm_megatron.cli {argv[0]} ...` "
            "(or torchrun), or ask for --ntasks=1"], said
    assert not os.path.exists(out)


def test_a_held_output_dir_is_refused_once_under_two_ranks(cogvideox_pipeline, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".run.lock", "w") as held:  # another live run's lock
        held.write("host h, pid 1, since then\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results = run_world(_cli_rank, 2, [cogvideox_pipeline] * 2, str(out), timeout_s=120)
    assert [code for code, _, _ in results] == [2, 2]
    assert results[0][1] == [f"{REFUSED}output_dir={str(out)!r} is in use by another run (host h, "
                             "pid 1, since then); wait for it to end, or use a new output_dir"]
    assert results[1][1] == []  # it printed the same line a second time


def test_a_rank_that_finds_nothing_to_do_still_meets_one_that_failed(cogvideox_ode_pairs, tmp_path):
    # rank 0 finds the collection finished (no process group to make); rank 1 lacks the teacher
    args = ["collect-ode", "--out", cogvideox_ode_pairs, "--num-pairs", "4", "--steps", "2",
            "--no-progress", "data.frames=2", "data.height=4", "data.width=4", "data.num_prompts=4",
            "parallel.timeout_s=300"]
    with open(os.path.join(cogvideox_ode_pairs, "manifest.json")) as f:
        teacher = json.load(f)["teacher"]["path"]
    missing = str(tmp_path / "not-on-this-node")
    results = run_world(_cli_by_rank, 2, [[*args, f"model.teacher={teacher}"], [*args, f"model.teacher={missing}"]],
                        timeout_s=120)
    assert [code for code, _ in results] == [2, 2]
    assert results[0][1] == []
    assert results[1][1] == [f"{REFUSED}model.teacher={missing!r}: directory not found (on rank 1 "
                             f"of 2, host {os.uname().nodename}; the other ranks passed this check)"]


def _cli_by_rank(argvs: list[list[str]]) -> tuple[int, list[str]]:
    return _cli(argvs[int(os.environ["RANK"])])


def _print_config(argv: list[str]) -> tuple[int, str]:
    from adm_megatron.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_print_config_under_two_ranks_prints_once(tmp_path):
    argv = ["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"), "--print-config",
            f"output_dir={tmp_path / 'run'}"]
    (code0, out0), (code1, out1) = run_world(_print_config, 2, argv, timeout_s=120)
    assert (code0, code1) == (0, 0)
    assert out0.count(f"output_dir: {tmp_path / 'run'}") == 1 and out1 == ""


def test_a_stop_signal_ends_a_wait_for_a_slower_rank_at_once(monkeypatch):
    """A rank waiting at the start-up meeting for a slower one (another node still loading) sat in
    the store's C++ wait, where no Python signal handler runs, until parallel.timeout_s (600 s by
    default, against a scheduler's 120 s grace), while its launcher had been told to stop."""
    import signal
    import threading

    import pytest
    from torch.distributed import TCPStore

    from adm_megatron.parallel.startup import exchange
    from adm_megatron.train.preemption import StartupStop, stops_end_startup

    store = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)  # rank 1 never comes
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    start = time.monotonic()
    with pytest.raises(StartupStop), stops_end_startup():
        exchange(store, 0, 2, None, timeout_s=30)
    assert time.monotonic() - start < 5


def test_waiting_for_a_slower_rank_logs_nothing_and_reads_its_outcome(capfd):
    """The meeting's wait for a rank that comes 2.5 s later: no line on stderr (the store's own wait,
    in 1 s slices, logged two c10d "waitForInput ... likely a timeout" warnings per second on every
    waiting rank, up to parallel.timeout_s), and the late rank's failure is read."""
    import threading

    from torch.distributed import TCPStore

    from adm_megatron.parallel.startup import exchange

    server = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    late = TCPStore("127.0.0.1", server.port, 2, False)
    came = []
    threading.Timer(2.5, lambda: came.append(exchange(late, 1, 2, "a path it lacks", timeout_s=30))).start()
    capfd.readouterr()
    start = time.monotonic()
    failures = exchange(server, 0, 2, None, timeout_s=30)
    assert 2.4 < time.monotonic() - start < 6
    assert [(r, m) for r, _, m in failures] == [(1, "a path it lacks")]
    deadline = time.monotonic() + 10
    while not came and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [[(r, m) for r, _, m in f] for f in came] == [[(1, "a path it lacks")]]
    assert capfd.readouterr().err == ""
