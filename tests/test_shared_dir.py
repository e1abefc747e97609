"""An output directory that is not the same directory on every rank (node-local disks: one path,
a different directory on each node) is refused in one line before anything is built
(adm_megatron/parallel/shared_dir.py): a 2-rank run used to finish "complete" with each rank's
checkpoint shares on its own disk and ``latest`` naming a checkpoint rank 0 alone could not load.
Here each rank is given its own directory under the same config key, as node-local disks would."""

from __future__ import annotations

import contextlib
import io
import os

from multiproc import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_rank(teacher: str, outs: list[str]) -> tuple[int, list[str]]:
    from adm_megatron.cli import main

    rank = int(os.environ["RANK"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                     f"model.teacher={teacher}", f"output_dir={outs[rank]}", "data.batch_size=1",
                     "train.max_iterations=1", "train.num_samples=0", "logging.wandb_mode=disabled"])
    return code, [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_an_output_dir_not_shared_by_every_rank_is_refused_in_one_line(cogvideox_pipeline, tmp_path):
    outs = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    results = run_world(_train_rank, 2, cogvideox_pipeline, outs, timeout_s=120)
    assert [code for code, _ in results] == [2, 2]
    host = os.uname().nodename
    assert results[0][1] == [f"adm-megatron: config error: output_dir={outs[0]!r}: not one directory on every rank: "
                             f"rank(s) 1 (host {host}) do not see the files rank 0 (host {host}) writes there; use a "
                             "directory on a filesystem every node mounts"]
    assert results[1][1] == []
    assert not os.path.exists(os.path.join(outs[0], "checkpoints")) and os.listdir(outs[0]) == []


def _check(paths: list[str]) -> list[str]:
    from adm_megatron.parallel import initialize_parallel
    from adm_megatron.parallel.shared_dir import check_shared_dir

    initialize_parallel(1, 1)
    check_shared_dir(paths[int(os.environ["RANK"])], "--out")
    return sorted(os.listdir(paths[0])) if os.environ["RANK"] == "0" else None  # rank 0 removes the marker


def test_a_shared_dir_passes_and_keeps_no_marker(tmp_path):
    out = str(tmp_path / "out")
    assert run_world(_check, 2, [out, out], timeout_s=120) == [[], None]
