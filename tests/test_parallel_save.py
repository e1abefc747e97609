"""A checkpoint's writing is split among the data-parallel ranks (megatron-core's fully parallel
save, as Megatron-LM's default ``--ckpt-fully-parallel-save``): at DP = 2 each rank writes a
share of every part of it (before, data-parallel rank 0 wrote, and staged in host memory, every
replicated weight and Adam moment alone), and a run resumed from it at DP = 2 trains on exactly as
the run that saved it (fp64, losses and gradient norms equal bit for bit)."""

from __future__ import annotations

import glob
import os
import re

from multiproc import run_world
from tiny_runs import tiny_fp64_run, without_timing

PARTS = ("generator", "fake_score", "train_state")


def _bytes_by_rank(part_dir: str) -> dict[int, int]:
    """Bytes of the shard files each rank wrote (torch DCP names them ``__<rank>_<n>.distcp``)."""
    written: dict[int, int] = {}
    for path in glob.glob(os.path.join(part_dir, "*.distcp")):
        rank = int(re.match(r"__(\d+)_\d+\.distcp$", os.path.basename(path)).group(1))
        written[rank] = written.get(rank, 0) + os.path.getsize(path)
    return written


def _save_at_dp2_then_resume(pipeline_dir: str, root: str) -> dict:
    import torch.distributed as dist

    from adm_megatron.config import load_config
    from adm_megatron.train.checkpoint import save_training_checkpoint
    from adm_megatron.train.trainer import Trainer

    def trainer(name: str, *overrides: str) -> Trainer:
        return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={root}/{name}",
                                          *tiny_fp64_run(3), "data.batch_size=1", *overrides]))

    saving = trainer("saved")
    saving.train_iteration(0)
    path = save_training_checkpoint(saving, 1)
    resumed = trainer("resumed", f"train.resume={path}")
    seen = {"start": resumed.start_iteration,
            "went_on": [without_timing(saving.train_iteration(i)) for i in (1, 2)],
            "resumed": [without_timing(resumed.train_iteration(i)) for i in (1, 2)]}
    if dist.get_rank() == 0:
        seen["written"] = {part: _bytes_by_rank(os.path.join(path, part)) for part in PARTS}
    return seen


def test_data_parallel_ranks_share_the_writing_and_the_checkpoint_resumes_exactly(tmp_path, world_of_one):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    ranks = run_world(_save_at_dp2_then_resume, 2, pipeline_dir, str(tmp_path), timeout_s=600)
    for part, written in ranks[0]["written"].items():
        total = sum(written.values())
        assert sorted(written) == [0, 1], (part, written)  # both ranks wrote shard files
        assert min(written.values()) > 0.25 * total, (part, written)  # each a real share
    for seen in ranks:
        assert seen["start"] == 1
        assert seen["resumed"] == seen["went_on"]
