"""Ranks launched with different configs (a config file edited on one node, an override given to
some ranks only) are stopped in one line before anything is built (adm_megatron/train/same_config.py):
a 2-rank run with another seed on rank 1 used to train, each replica with its own draws."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from multiproc import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_rank(teacher: str, out: str, extra: list[list[str]]) -> tuple[int, list[str]]:
    from adm_megatron.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                     f"model.teacher={teacher}", f"output_dir={out}", "data.batch_size=1", "train.max_iterations=1",
                     "train.num_samples=0", "logging.wandb_mode=disabled", *extra[int(os.environ["RANK"])]])
    return code, [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_ranks_with_different_configs_are_stopped_in_one_line(cogvideox_pipeline, tmp_path):
    out = tmp_path / "run"
    results = run_world(_train_rank, 2, cogvideox_pipeline, str(out), [[], ["seed=7", "optim.generator.lr=0.001"]],
                        timeout_s=120)
    assert [code for code, _ in results] == [2, 2]
    assert results[0][1] == [
        "adm-megatron: config error: the ranks were given different configs: optim.generator.lr=0.0001 on rank 0 but "
        "0.001 on rank 1, seed=1234 on rank 0 but 7 on rank 1; rank(s) 1 differ from rank 0: give every rank the "
        "same config file and overrides"]
    assert results[1][1] == []
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")


def _resume_rank(cases: list[list[str]]) -> list[str]:
    from adm_megatron.config import ConfigError
    from adm_megatron.parallel import initialize_parallel
    from adm_megatron.parallel.startup import FailedElsewhere
    from adm_megatron.train.same_config import check_same_resume

    initialize_parallel(tensor_parallel=1, context_parallel=1, seed=0)
    results = []
    for checkpoints in cases:
        try:
            check_same_resume(checkpoints[int(os.environ["RANK"])], "/runs/live")
            results.append("passed")
        except (ConfigError, FailedElsewhere) as err:
            results.append(f"{type(err).__name__}: {err}")
    return results


@pytest.mark.slow  # a 2-process world: about 10 s
def test_ranks_that_resolved_another_runs_latest_on_either_side_of_its_save_are_stopped_in_one_line():
    """train.resume=RUN of a run still training: each rank reads its checkpoints/latest, and a save in
    between used to have them load their shards of two checkpoints."""
    same, moved = ["/runs/live/checkpoints/iter_0000008"] * 2, ["/runs/live/checkpoints/iter_0000008",
                                                                "/runs/live/checkpoints/iter_0000010"]
    assert run_world(_resume_rank, 2, [same, moved], timeout_s=120) == [
        ["passed", "ConfigError: train.resume=/runs/live: rank 0 resolved /runs/live/checkpoints/iter_0000008 but "
                   "rank 1 /runs/live/checkpoints/iter_0000010 (the run there saved in between); nothing was loaded: "
                   "name one, train.resume=/runs/live/checkpoints/iter_0000008"],
        ["passed", "FailedElsewhere: the ranks resolved different checkpoints"]]
