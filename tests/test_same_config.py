"""Ranks launched with different configs (a config file edited on one node, an override given to
some ranks only) are stopped in one line before anything is built (adm_megatron/train/same_config.py):
a 2-rank run with another seed on rank 1 used to train, each replica with its own draws."""

from __future__ import annotations

import contextlib
import io
import os

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
