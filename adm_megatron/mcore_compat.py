"""Where megatron-core's API differs between the releases this project supports (0.16 on Python
3.11, CI's 0.16.1; 0.17 to 0.19 on Python 3.12, checked against 0.17.1 and 0.19.2), the one place
that picks the right call.  Each difference is found by feature detection (a signature, an
attribute), not by comparing version numbers, so a release in between or after takes the branch
whose API it has.

* ``dist_checkpointing.save(..., async_sharded_save=True)``: up to 0.16 it always plans
  megatron-core's own asynchronous write (``strategies.async_utils.AsyncRequest``, run by its
  ``AsyncCallsQueue``).  From 0.17 it takes ``async_strategy``, whose default ``"nvrx"`` imports
  NVIDIA's ``nvidia-resiliency-ext`` (and fails without it); ``"mcore"`` keeps megatron-core's
  own.  :func:`async_save_kwargs` asks for ``"mcore"`` where the argument exists: the background
  saves (``adm_megatron.train.background_save``) drive megatron-core's queue themselves.
* The queue the asynchronous writers put their results on: ``filesystem_async.
  _get_write_results_queue()`` up to 0.16, ``get_write_results_queue(mp_mode='spawn')`` from 0.17
  (see :func:`write_results_queue`).
* A checkpoint's common (non-sharded) state: up to 0.18 ``dist_checkpointing.save`` writes it to
  ``common.pt`` and names its ``common_backend`` in ``metadata.json``; from 0.19 it is one more
  object inside the torch_dist shards (a ``common_state`` entry in ``.metadata``), there is no
  ``common.pt`` and ``metadata.json`` names no ``common_backend``.  0.19 still reads the older
  layout; up to 0.18 the newer one cannot be read (megatron fails deep in its loader), so
  :func:`unreadable_layout` says so in one line first.  :func:`common_state_in_file` tells the
  damage checks whether a ``common.pt`` belongs to a checkpoint.

* From 0.17 importing megatron-core (``tensor_parallel.random``) imports
  ``torch.utils.cpp_extension``; with a CUDA build of torch on a host without a GPU but with a CUDA
  toolkit (a login node converting checkpoints, say) torch then logs "No CUDA runtime is found,
  using CUDA_HOME=..." to stderr, a notice about building C++ extensions, which this project never
  does.  :func:`quiet_import_notices` drops it, so the commands' one-line errors stay one line.

The CPU-only redirections of CUDA calls (one of which, ``torch.cuda.current_stream``, only 0.19
on needs) are in ``adm_megatron.parallel.cpu_shim``.

Not handled here, for whoever maintains this: from 0.17 megatron-core logs once per process that
its own asynchronous save ("mcore") is deprecated in favour of NVRx; a release that removes it
will need the background saves moved to ``nvidia-resiliency-ext``'s queue.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os

__all__ = [
    "COMMON_STATE_FILE",
    "async_save_kwargs",
    "common_state_in_file",
    "quiet_import_notices",
    "reads_common_state_in_shards",
    "unreadable_layout",
    "write_results_queue",
]

COMMON_STATE_FILE = "common.pt"  # a checkpoint's common state, written by megatron-core up to 0.18


@functools.cache
def async_save_kwargs() -> dict:
    """Keyword arguments for ``dist_checkpointing.save(..., async_sharded_save=True)`` that make it
    plan megatron-core's own asynchronous write on every supported release."""
    from megatron.core.dist_checkpointing import serialization  # where save is defined (not a wrapper)

    if "async_strategy" in inspect.signature(serialization.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


def write_results_queue():
    """megatron-core's queue of the asynchronous writers' results (created on first use)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    get = getattr(filesystem_async, "get_write_results_queue", None)
    if get is None:
        get = getattr(filesystem_async, "_get_write_results_queue", None)
    if get is None:
        raise ImportError(
            "megatron.core.dist_checkpointing.strategies.filesystem_async has neither "
            "get_write_results_queue nor _get_write_results_queue: this megatron-core release is "
            "not supported by adm-megatron's background checkpoint saves"
        )
    return get()


def common_state_in_file(ckpt_dir: str) -> bool:
    """Whether the megatron checkpoint ``ckpt_dir`` keeps its common state in ``common.pt`` (its
    ``metadata.json`` names a ``common_backend``: written by megatron-core up to 0.18) rather than
    inside its shards (0.19 on).  An unreadable ``metadata.json`` counts as the older layout: the
    damage checks report the file itself."""
    try:
        with open(os.path.join(ckpt_dir, "metadata.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or "common_backend" in config


@functools.cache
def reads_common_state_in_shards() -> bool:
    """Whether the installed megatron-core reads checkpoints that keep their common state inside
    the shards (its ``CheckpointingConfig`` no longer has a ``common_backend``)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return "common_backend" not in {field.name for field in dataclasses.fields(CheckpointingConfig)}


def unreadable_layout(ckpt_dir: str) -> str | None:
    """One line when the installed megatron-core cannot read the checkpoint ``ckpt_dir``'s layout
    (written by a newer one), else None."""
    if common_state_in_file(ckpt_dir) or reads_common_state_in_shards():
        return None
    from adm_megatron.versions import installed_version

    return (
        f"{ckpt_dir}: written by megatron-core 0.19 or later (its common state is inside the shards, "
        f"there is no {COMMON_STATE_FILE}), which the installed megatron-core "
        f"{installed_version('megatron-core')} cannot read: load it with megatron-core >= 0.19 "
        "(Python >= 3.12)"
    )


# import-time notices that say nothing about a run: torch's on a GPU-less host with a CUDA build
# (megatron-core >= 0.17 imports its extension loader), and torchao's when diffusers imports it (its
# quantizer checks) where its C++ kernels or triton are not for this machine -- model.fp8's torchao
# recipes use neither (models/fp8_torchao.py)
IMPORT_NOTICES = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "torchao": ("Skipping import of cpp extensions", "Failed to load "),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
}


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(start in message for start in self.starts)


def quiet_import_notices() -> None:
    """Drop the :data:`IMPORT_NOTICES` (each logger's own records); call before megatron-core and
    diffusers are imported."""
    for name, starts in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(starts))
