"""Overrides of the tiny fp64 ADM run that the multi-process equality tests train (a tiny
pipeline's teacher, 2 x 4 x 4 latents, a head on every block, lr 1e-3 for every network, nothing
written but checkpoints): fp64 so that summation order cannot hide a difference. Also which metrics
measure time, which no equality test compares."""

from __future__ import annotations


def tiny_fp64_run(iterations: int) -> list[str]:
    return [
        "model.dtype=fp64",
        "data.num_prompts=4", "data.frames=2", "data.height=4", "data.width=4",
        "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
        f"train.max_iterations={iterations}", "train.num_samples=0", "train.export=false",
        "logging.wandb_mode=disabled", "logging.progress=false",
        "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
    ]


def is_timing(key: str) -> bool:
    """Metrics that measure time (each phase's seconds, the iteration's throughput): they differ
    between two runs that compute the same."""
    return key.endswith("/seconds") or key.startswith("throughput/")


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not is_timing(k)}
