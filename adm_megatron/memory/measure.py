"""Measured peak tensor memory of each ADM phase, on any device, from torch.profiler's memory profile.

How: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of the c10
allocator (the CPU allocator here, the CUDA caching allocator's tensor blocks on a GPU) as an
``Allocation`` event with its signed size. The profiler runs from before the ``Trainer`` is built,
so the running sum of those sizes is the live tensor memory of the run (tensors that existed before
the trainer are left out: none of them belongs to it). The profiler sees the allocator only on the
threads it profiles; a block freed on a gloo worker thread is counted free where that worker drops
it, inferred from the collectives' ranges (see ``signed_sizes``). Each phase of each iteration is
marked with a ``record_function`` range (the trainer's ``PhaseRunner.run`` wrapped on this one instance); a
phase's measured peak is the largest running sum inside its range, and its resident memory the sum
at its start. Only the last iteration counts: by then every optimizer state exists (AdamW allocates
its moments at a network's first step), so the figures are the steady state the planner predicts.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_MARK = "adm_phase:"


@dataclass(frozen=True)
class PhaseMeasurement:
    resident_bytes: int  # live tensor bytes when the phase starts
    peak_bytes: int  # the largest live tensor bytes during the phase (forward, backward, step)


def _allocations_and_marks(prof, alive_at_end: set[int] | None = None
                           ) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """(time, signed size) of every allocation and free of the profile (``signed_sizes``), and each
    phase mark's (start, end) time."""
    events, marks, collective_ends, outside_ops = [], {}, [], set()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name == "[memory]":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
            if node.parent is None:  # made outside any op: not a collective's, see signed_sizes
                outside_ops.add((node.start_time_ns, node.extra_fields.ptr))
        elif node.name.startswith(_MARK):
            marks[node.name[len(_MARK):]] = (node.start_time_ns, node.end_time_ns)
        elif node.name.startswith(_COLLECTIVES):
            collective_ends.append(node.end_time_ns)
    return signed_sizes(events, alive_at_end, collective_ends, outside_ops), marks


# The profiler's ranges of the collectives' work ("gloo:all_reduce", ...), which end when it completes.
_COLLECTIVES = ("gloo:", "nccl:")


def signed_sizes(events: list[tuple[int, int, int]], alive_at_end: set[int] | None = None,
                 collective_ends: list[int] = (), outside_ops: set[tuple[int, int]] = frozenset()
                 ) -> list[tuple[int, int]]:
    """(time, signed size) from allocator events (time, size, address), in time order.

    - A free of an address the profile never saw allocated is left out: that block existed before
      the profile, so it is not the trainer's. The allocator reports such frees when the block was
      made under an earlier profile (it keeps the sizes of what it allocated while profiling): an
      earlier measurement's leftovers, freed when the garbage collector takes them. Counted, they
      took a tiny run's live sum below zero.
    - The profiler sees allocator events only on the threads it profiles, so a block freed on another
      thread (gloo's workers drop the last reference to a collective's tensors when its work
      completes, racing the calling thread) has no free event. Such a block was freed if the
      allocator hands its address out again (it cannot while the block is in use), or if no live
      tensor holds its address when the profile is over (``alive_at_end``: the storages' addresses
      then; None: not known). Its free is placed where a worker drops it: at the end of the first
      collective's work (``collective_ends``) that ends after the block was made, or at the reuse if
      that comes first. Counting it live until its address happened to be reused (or for ever) made
      a TP + SP run's phases 16-17% larger than the plan on loaded machines, by an amount that
      changed from run to run. Blocks made outside any op (``outside_ops``: (time, address)),
      storages a loader makes directly such as ``torch.load``'s, are no collective's: they count
      free at their address's reuse only (the scan of Python's tensors did not reach two such that
      were alive)."""
    ends = sorted(collective_ends)
    last = max((t for t, _, _ in events), default=0)

    def freed_by_a_worker(made: int, bound: int) -> int:
        i = bisect.bisect_right(ends, made)
        return min(ends[i], bound) if i < len(ends) else bound

    live: dict[int, tuple[int, int]] = {}  # address -> (time made, size)
    allocations = []
    for time_ns, size, ptr in sorted(events):
        if size > 0:
            if ptr in live:  # reused: the block there was freed unseen
                made, old = live.pop(ptr)
                freed = time_ns if (made, ptr) in outside_ops else freed_by_a_worker(made, time_ns)
                allocations.append((freed, -old))
            live[ptr] = (time_ns, size)
        elif live.pop(ptr, None) is None:
            continue
        allocations.append((time_ns, size))
    if alive_at_end is not None:
        allocations += [(freed_by_a_worker(made, last), -size) for ptr, (made, size) in live.items()
                        if ptr not in alive_at_end and (made, ptr) not in outside_ops]
    return sorted(allocations)


def live_tensors() -> list[torch.Tensor]:
    """Every tensor Python still holds (parameters, optimizer states, buffers), from the garbage
    collector's objects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some deprecated module attributes warns
        # not through a weak proxy: isinstance on one whose object is gone raises ReferenceError (a proxy
        # some earlier code in the process left in the heap stopped the measurement)
        return [obj for obj in gc.get_objects()
                if not isinstance(obj, weakref.ProxyTypes) and isinstance(obj, torch.Tensor)]


def _live_storage_addresses() -> set[int]:
    """The storage addresses of :func:`live_tensors`: the blocks alive when a profile ends."""
    addresses = set()
    for tensor in live_tensors():
        try:
            addresses.add(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            continue
    return addresses


def peak_during(fn: Callable[[], object], threads: int | None = None) -> int:
    """The largest live tensor bytes, above what was live before, while ``fn`` runs (the same
    accounting as :func:`measure_phases`), with ``threads`` intra-op threads (None: as set)."""
    with _intra_op_threads(threads), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, size in _allocations_and_marks(prof)[0]:
        live += size
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _intra_op_threads(threads: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_phases(build_trainer: Callable[[], object], iterations: int = 2,
                   samples: bool = False) -> dict[str, PhaseMeasurement]:
    """Build a trainer and run ``iterations`` ADM iterations under the memory profiler; returns each
    phase's resident and peak tensor bytes in the last iteration, keyed by phase name; with
    ``samples`` also the run's samples rendered after it (``samples``)."""
    if iterations < 2:
        raise ValueError(f"iterations={iterations}: need >= 2 (the first one allocates the optimizer states)")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = build_trainer()
        run = trainer.phases.run

        def marked_run(phase, loss_fn, iteration, **kwargs):
            with record_function(f"{_MARK}{phase}:{iteration}"):
                return run(phase, loss_fn, iteration, **kwargs)

        trainer.phases.run = marked_run
        for iteration in range(iterations):
            trainer.train_iteration(iteration)
        if samples:
            from adm_megatron.train.samples import RunSamples

            with record_function(f"{_MARK}samples:{iterations - 1}"):
                RunSamples(trainer).render(iterations)
        alive = _live_storage_addresses()  # while the trainer still holds its tensors
    allocations, marks = _allocations_and_marks(prof, alive)
    last = iterations - 1
    windows = {name.rsplit(":", 1)[0]: span for name, span in marks.items() if name.endswith(f":{last}")}
    result = {}
    for phase, (start, end) in windows.items():
        live = sum(size for t, size in allocations if t < start)
        resident, peak = live, live
        for t, size in allocations:
            if start <= t <= end:
                live += size
                peak = max(peak, live)
        result[phase] = PhaseMeasurement(resident, peak)
    return result
