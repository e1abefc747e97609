"""Training checkpoints: ``output_dir/checkpoints/iter_NNNNNNN/`` written atomically.

Inside: ``generator/`` and ``fake_score/`` as megatron-core distributed checkpoints (loadable at any
TP / CP layout, convertible with ``tools/convert_checkpoint.py megatron-to-hf``), the discriminator
heads of methods that have them (``discriminator.pt``, replicated, written by rank 0) and ``trainer_state.json`` (iteration and
the run config). The directory appears under its final name only once everything is written.
"""

from __future__ import annotations

import json
import os

import torch

from adm_megatron.config import config_to_dict
from adm_megatron.convert.checkpoint import save_megatron_checkpoint, write_atomically


def checkpoint_dir(output_dir: str, iteration: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"iter_{iteration:07d}")


def save_training_checkpoint(trainer, iteration: int) -> str:
    """Collective: the trainable state after ``iteration`` iterations."""
    rank0 = trainer.info.rank == 0

    def write(tmp: str) -> None:
        save_megatron_checkpoint(trainer.generator, os.path.join(tmp, "generator"), trainer.arch)
        save_megatron_checkpoint(trainer.fake_score, os.path.join(tmp, "fake_score"), trainer.arch)
        if rank0 and trainer.heads is not None:
            torch.save(trainer.heads.state_dict(), os.path.join(tmp, "discriminator.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"iteration": iteration, "config": config_to_dict(trainer.config)}, f, indent=2)

    return write_atomically(checkpoint_dir(trainer.config.output_dir, iteration), True, write)
