"""The memory plan's host terms against what a run holds on the host: the offload host buffers of
a CPU run equal the planned offloaded optimizer states and weights to the byte, and the tensors
megatron-core stages in host memory for each of two data-parallel ranks' share of a checkpoint add up
to the planned staging of both, each rank's within 20% of it (the fully parallel save gives whole
tensors to ranks)."""

from __future__ import annotations

import pytest
import torch

from test_offload import COMMON

MIXED = ["optim.generator.offload=optimizer_and_params", "optim.fake_score.offload=optimizer",
         "optim.discriminator.offload=none"]
EVERY = [f"optim.{n}.offload=optimizer_and_params" for n in ("generator", "fake_score", "discriminator")]


def _config(pipeline_dir: str, output_dir: str, overrides: list[str]):
    from adm_megatron.config import load_config

    return load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON,
                              "train.ema_decay=0.9", *overrides])


def _plan(config, world_size: int):
    from adm_megatron.memory.run_plan import plan_run

    return plan_run(config, world_size, device="cpu", card_gib=1.0, pinned_memory=True,
                    cpu_threads=torch.get_num_threads())


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


@pytest.mark.parametrize("offload", [MIXED, EVERY], ids=["mixed", "everything"])
def test_offload_host_buffers_are_the_planned_bytes(offload, pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.train.trainer import Trainer

    config = _config(pipeline_dir, str(tmp_path / "run"), offload)
    trainer = Trainer(config)
    for iteration in range(2):  # weights move from the second iteration on (the phases' use is learned)
        trainer.train_iteration(iteration)
    held = sum(t.numel() * t.element_size() for t in trainer.offload.mover.host.values())
    host = _plan(config, 1).host
    assert held > 0
    assert host["offloaded optimizer states"] + host["offloaded weights"] == held


def _staged_at_dp2(pipeline_dir: str, output_dir: str) -> int:
    """Bytes of the tensors megatron-core stages in host memory for this rank's share of a checkpoint."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from adm_megatron.train.checkpoint import save_training_checkpoint
    from adm_megatron.train.trainer import Trainer

    staged = []
    preload = FileSystemWriterAsync.preload_tensors

    def counting(write_buckets, non_blocking=True):
        buckets = preload(write_buckets, non_blocking)
        staged.extend(t.numel() * t.element_size() for _, _, (_, tensors) in buckets for _, t in tensors)
        return buckets

    FileSystemWriterAsync.preload_tensors = staticmethod(counting)
    try:
        trainer = Trainer(_config(pipeline_dir, output_dir, ["data.batch_size=1"]))
        trainer.train_iteration(0)
        save_training_checkpoint(trainer, 1)
    finally:
        FileSystemWriterAsync.preload_tensors = staticmethod(preload)
    return sum(staged)


def test_each_data_parallel_rank_stages_about_the_planned_checkpoint_share(pipeline_dir, tmp_path):
    from multiproc import run_world

    staged = run_world(_staged_at_dp2, 2, pipeline_dir, str(tmp_path / "run"), timeout_s=300)
    planned = _plan(_config(pipeline_dir, str(tmp_path / "plan"), ["data.batch_size=1"]), 2).host["checkpoint staging"]
    assert sum(staged) == 2 * planned  # every tensor of the checkpoint, staged once
    for size in staged:  # split evenly, up to the whole tensors each rank is given
        assert abs(size - planned) <= 0.2 * planned, (staged, planned)
