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

The CPU-only redirections of CUDA calls (one of which, ``torch.cuda.current_stream``, only newer
releases need) are in ``adm_megatron.parallel.cpu_shim``.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["async_save_kwargs", "write_results_queue"]


@functools.cache
def async_save_kwargs() -> dict:
    """Keyword arguments for ``dist_checkpointing.save(..., async_sharded_save=True)`` that make it
    plan megatron-core's own asynchronous write on every supported release."""
    from megatron.core import dist_checkpointing

    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
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
