"""Wall-clock timing on CPU or GPU: synchronised timers, alternating repeats, peak memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset; None on CPU (not measured)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one synchronised call of ``fn`` and the peak memory during it."""
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start, peak_memory_bytes(device)


def alternating(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int):
    """Runs every function once per round, in turn, ``warmup`` unrecorded rounds then ``repeats``;
    returns {name: {"seconds": [per repeat], "median_s", "peak_memory_bytes"}}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int | None] = {name: None for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            s, peak = timed(fn, device)
            seconds[name].append(s)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0, peak)
    return {name: {"seconds": seconds[name], "median_s": statistics.median(seconds[name]),
                   "peak_memory_bytes": peaks[name]} for name in fns}
