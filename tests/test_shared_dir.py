"""An output directory that is not the same directory on every rank (node-local disks: one path,
a different directory on each node) is refused in one line before anything is built
(adm_megatron/parallel/shared_dir.py): a 2-rank run used to finish "complete" with each rank's
checkpoint shares on its own disk and ``latest`` naming a checkpoint rank 0 alone could not load.
Here each rank runs in its own working directory with the same relative output_dir: one path,
a different directory on each rank, as node-local disks give."""

from __future__ import annotations

import contextlib
import io
import os

from multiproc import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_rank(teacher: str, cwds: list[str]) -> tuple[int, list[str]]:
    from adm_megatron.cli import main

    os.chdir(cwds[int(os.environ["RANK"])])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                     f"model.teacher={teacher}", "output_dir=run", "data.batch_size=1",
                     "train.max_iterations=1", "train.num_samples=0", "logging.wandb_mode=disabled"])
    return code, [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_an_output_dir_not_shared_by_every_rank_is_refused_in_one_line(cogvideox_pipeline, tmp_path):
    cwds = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for cwd in cwds:
        os.makedirs(cwd)
    results = run_world(_train_rank, 2, cogvideox_pipeline, cwds, timeout_s=120)
    assert [code for code, _ in results] == [2, 2]
    host = os.uname().nodename
    assert results[0][1] == ["adm-megatron: config error: command line: output_dir='run': not one directory on "
                             f"every rank: rank(s) 1 (host {host}) do not see the files rank 0 (host {host}) writes "
                             "there; use a directory on a filesystem every node mounts"]
    assert results[1][1] == []
    assert os.listdir(tmp_path / "node0" / "run") == [] and os.listdir(tmp_path / "node1") == []


def _check(paths: list[str]) -> list[str]:
    from adm_megatron.parallel import initialize_parallel
    from adm_megatron.parallel.shared_dir import check_shared_dir

    initialize_parallel(1, 1)
    check_shared_dir(paths[int(os.environ["RANK"])], "--out")
    return sorted(os.listdir(paths[0])) if os.environ["RANK"] == "0" else None  # rank 0 removes the marker


def test_a_shared_dir_passes_and_keeps_no_marker(tmp_path):
    out = str(tmp_path / "out")
    assert run_world(_check, 2, [out, out], timeout_s=120) == [[], None]
