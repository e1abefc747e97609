"""A checkpoint saved at TP = 2 (with sequence parallelism) resumes at TP = 1 (one process), at
DP = 2 and in one process with two accumulated micro-batches (same global batch) through
``train.resume=PATH``: the weights, Adam moments, schedulers and
EMA reshard, and every phase's loss of the iterations after the checkpoint equals the TP = 2 run's
own continuation within 1e-6 (fp64, so summation order cannot hide a difference)."""

from __future__ import annotations

import json

from multiproc import run_world
from tiny_runs import tiny_fp64_run

TOL = 1e-6
ITERATIONS = 3
COMMON = [*tiny_fp64_run(ITERATIONS), "train.ema_decay=0.5", "optim.fake_score.decay_style=cosine"]


def _losses(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.endswith("/loss")}


def _resumed_losses(pipeline_dir: str, output_dir: str, checkpoint: str, overrides: list[str]) -> list[dict]:
    """This rank's losses of every iteration after ``checkpoint``, resumed at the given layout."""
    from adm_megatron.config import load_config
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON,
                                f"train.resume={checkpoint}", *overrides])
    trainer = Trainer(config)
    assert trainer.start_iteration == 1
    losses = [_losses(trainer.train_iteration(i)) for i in range(trainer.start_iteration, ITERATIONS)]
    destroy_parallel()
    return losses


def _save_at_tp2_then_resume_at_dp2(pipeline_dir: str, root: str) -> list[dict]:
    from adm_megatron.config import load_config
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    tp2 = ["data.batch_size=2", "parallel.tensor_parallel=2", "model.sequence_parallel=true"]
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={root}/tp2", *COMMON,
                                "train.save_every=1", *tp2])
    Trainer(config).fit()
    destroy_parallel()
    return _resumed_losses(pipeline_dir, f"{root}/dp2", f"{root}/tp2/checkpoints/iter_0000001",
                           ["data.batch_size=1"])


def test_a_tp2_checkpoint_resumes_at_tp1_and_dp2_with_equal_losses(tmp_path, world_of_one):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    dp2 = run_world(_save_at_tp2_then_resume_at_dp2, 2, pipeline_dir, str(tmp_path), timeout_s=600)
    tp2 = [_losses(json.loads(line)) for line in open(tmp_path / "tp2" / "metrics.jsonl")][1:]
    checkpoint = str(tmp_path / "tp2" / "checkpoints" / "iter_0000001")
    tp1 = _resumed_losses(pipeline_dir, str(tmp_path / "tp1"), checkpoint, ["data.batch_size=2"])
    # the same global batch as two accumulated micro-batches of 1
    accumulated = _resumed_losses(pipeline_dir, str(tmp_path / "accumulated"), checkpoint,
                                  ["data.batch_size=1", "data.global_batch_size=2"])
    assert len(tp2) == len(tp1) == len(accumulated) == ITERATIONS - 1
    for i, want in enumerate(tp2):
        assert set(tp1[i]) == set(want) and len(want) == 3  # fake score, generator, discriminator
        for key, value in want.items():
            # DP ranks report the mean over their own half of the global batch
            got_dp2 = (dp2[0][i][key] + dp2[1][i][key]) / 2
            for layout, got in (("tp1", tp1[i][key]), ("dp2", got_dp2), ("accumulated", accumulated[i][key])):
                assert abs(got - value) <= TOL * max(1.0, abs(value)), (layout, i + 1, key, got, value)
