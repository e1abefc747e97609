"""Checkpoints written by a process of their own: while training goes on (``train.async_save``,
as Megatron-LM's ``--async-save``), or waited for at once (a synchronous save).

``adm_megatron.train.checkpoint.start_training_checkpoint`` gathers a checkpoint's state, has
megatron-core plan its files (``dist_checkpointing.save(..., async_sharded_save=True)``, one
request per part) and writes the small files. :meth:`BackgroundSaves.start` copies the device
tensors to host memory (megatron's preload) and forks one process per rank that writes the parts
in order (megatron-core's ``AsyncCallsQueue`` with its fork-per-save caller). The fork is the
snapshot: the training steps that follow update parameters, moments and host-offloaded states in
place, and none of that reaches the files. Pinned host memory is no copy-on-write page after a fork
(the child sees the parent's later writes: Megatron-LM PR #2288), and megatron's preload passes
host tensors through as they are, so the pinned buffers of host-offloaded states
(``train/offload.py``) are first copied to pageable memory (:func:`pageable_copies`; the first GPU
run showed a background checkpoint holding the next iteration's offloaded moments without it). The
pinned tensors the preload stages are written once, before the fork, and megatron's queue holds
them (in the request it keeps) until the write's finalizers have run, so torch's host allocator
cannot hand them out again meanwhile. Each iteration :meth:`BackgroundSaves.poll` asks every
rank (one all-reduce of an int while a save is in flight, nothing otherwise) whether all writes
have finished; once they have, megatron's finalizers write each part's metadata and the checkpoint
is published: its temporary directory is renamed, ``latest`` moves and old ones are pruned.

A trainer killed meanwhile takes its writer with it (``adm_megatron.train.save_workers``) and
leaves a temporary directory that the next start removes; the previous checkpoint stays the latest.
A write that fails on any rank is reported on every rank in one line and stops the run, with the
temporary directory removed; so is a write that :meth:`BackgroundSaves.wait` has waited for longer
than its limit (``parallel.timeout_s``; megatron's writer waits for its workers without one, and a
worker killed by the OOM killer would leave the run waiting for good).

Costs: host memory for a copy of the rank's share of the checkpoint while it is written, and a
training pause of the device-to-host copy and the fork instead of the whole write.
"""

from __future__ import annotations

import logging
import queue
import time
from functools import partial
from typing import Callable, NamedTuple

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException

from adm_megatron.convert.checkpoint import CheckpointError, one_line
from adm_megatron.mcore_compat import write_results_queue
from adm_megatron.parallel import from_rank0

logger = logging.getLogger(__name__)


class BackgroundCheckpoint(NamedTuple):
    """A checkpoint staged by ``start_training_checkpoint``, not yet written."""

    target: str  # the directory it is published as
    requests: list[AsyncRequest]  # megatron-core's, one per part, in the order they are written
    publish: Callable[[BaseException | None], str]  # collective: rename, ``latest``, pruning
    began: float  # time.monotonic() when training paused for it


def _map_tensors(obj, fn):
    """``obj`` (megatron's write buckets: nested lists, tuples and dicts of tensors and the rest)
    with every tensor ``t`` replaced by ``fn(t)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [_map_tensors(item, fn) for item in obj]
    if isinstance(obj, tuple):
        items = [_map_tensors(item, fn) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    return obj


def _pinned_on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_pinned()


def pageable_copies(staged, unstaged):
    """``staged`` (what megatron's preload made of the write buckets ``unstaged``) with a pageable
    copy of every pinned host tensor that was on the host already (passed through, not staged:
    host-offloaded optimizer states), which the writer's fork then snapshots. Tensors the preload
    copied from the device stay as they are (see the module docstring)."""
    shared: set[int] = set()

    def note(tensor: torch.Tensor) -> torch.Tensor:
        if _pinned_on_host(tensor):
            shared.add(id(tensor))
        return tensor

    _map_tensors(unstaged, note)
    return _map_tensors(staged, lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t) if id(t) in shared else t)


def _write_in_order(calls: list[tuple]) -> None:
    """The writer process: each part's megatron write function (their results go through
    megatron's queue, first in first out, to the finalizers that run in the same order)."""
    for fn, args, kwargs in calls:
        fn(*args, **kwargs)


def _drop_unread_results() -> None:
    """After a failed finalizer the later parts' finalizers do not run, and their write results
    (every writer has finished) would be read by the next save's: drop them."""
    results = write_results_queue()
    while True:
        try:
            results.get_nowait()
        except queue.Empty:
            return


def _reason(exc: BaseException) -> str:
    """One line: the first failed rank's error (torch DCP wraps them with their tracebacks)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (error, _trace) = next(iter(sorted(exc.failures.items())))
        return f"rank {rank}: {one_line(error)}"
    return one_line(exc)


class BackgroundSaves:
    """At most one checkpoint in flight; every method but :meth:`abort` is collective."""

    POLL_S = 0.2  # wait()'s polling interval

    def __init__(self, limit_s: float):
        self.limit_s = limit_s  # how long wait() waits for the writers
        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: BackgroundCheckpoint | None = None
        self._started = 0.0

    @property
    def pending(self) -> str | None:
        """The checkpoint being written, if any."""
        return None if self._pending is None else self._pending.target

    def start(self, checkpoint: BackgroundCheckpoint) -> None:
        """Stage ``checkpoint``'s tensors on the host and fork its writer; returns at once."""
        if self._pending is not None:
            raise RuntimeError(f"{checkpoint.target}: {self._pending.target} is still being written; wait() first")
        calls = []
        for request in checkpoint.requests:
            if request.async_fn is None:  # nothing of this part on this rank
                continue
            args = list(request.async_fn_args)
            if request.preload_fn is not None:  # megatron's convention: args[1] are the write buckets
                args[1] = pageable_copies(request.preload_fn(), args[1])
            calls.append((request.async_fn, args, request.async_fn_kwargs))
        finalizers = [fn for request in checkpoint.requests for fn in request.finalize_fns]
        writer = partial(_write_in_order, calls) if calls else None
        self._queue.schedule_async_request(AsyncRequest(writer, (), finalizers))
        self._pending, self._started = checkpoint, time.monotonic()
        logger.info("%s: staged, its writer started (training paused %.2f s)", checkpoint.target,
                    self._started - checkpoint.began)

    def poll(self) -> str | None:
        """Publish the checkpoint in flight if every rank's writer has finished. Returns its
        directory when it was published now."""
        checkpoint = self._pending
        if checkpoint is None:
            return None
        failure = None
        try:
            if not self._queue.maybe_finalize_async_calls(blocking=False):
                return None
        # megatron raises torch DCP's CheckpointException (a BaseException) on every rank when one
        # rank's write failed
        except (Exception, CheckpointException) as exc:  # noqa: BLE001
            _drop_unread_results()
            failure = CheckpointError(f"{checkpoint.target}: writing it failed "
                                      f"({_reason(exc)}); the previous checkpoint stays the latest")
        self._pending = None
        path = checkpoint.publish(failure)
        logger.info("%s: written (%.1f s after its writer started)", path, time.monotonic() - self._started)
        return path

    def wait(self) -> str | None:
        """Publish the checkpoint in flight, waiting for its writers at most ``limit_s`` seconds
        (rank 0's clock decides): past that, a writer is taken to be dead or stuck (megatron's
        writer waits for its workers without a limit, and one killed, by the OOM killer say,
        leaves it waiting for good), the writers are ended and the run stops in one line."""
        deadline = time.monotonic() + self.limit_s
        while self._pending is not None:
            published = self.poll()
            if published is not None:
                return published
            if from_rank0(time.monotonic() > deadline):
                checkpoint = self._pending
                self.abort()
                checkpoint.publish(CheckpointError(  # raises, after removing the temporary directory
                    f"{checkpoint.target}: its writer has not finished {self.limit_s:g} s after "
                    "training began waiting for it (parallel.timeout_s): a writer process died or the "
                    "filesystem hangs; the previous checkpoint stays the latest"))
            time.sleep(self.POLL_S)
        return None

    def abort(self) -> None:
        """Local (a rank that fails calls it alone): end this rank's writer. Its temporary
        directory stays for the next start to remove, and ``latest`` names the previous checkpoint."""
        for active in self._queue.async_calls:
            active.async_caller.close(abort=True)
        self._queue.async_calls.clear()
        self._pending = None
