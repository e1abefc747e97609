"""Where one call's time goes, by kind of kernel (``adm-megatron bench --profile``).

One more call of an already warmed-up closure runs under ``torch.profiler``; the time of every event
that does work is summed by name and sorted into categories -- attention, convolution, GEMM,
normalisation, copies, other (elementwise, fused Triton kernels, reductions) -- plus the heaviest
names. On a GPU the events are the CUDA kernels (and memcpy / memset), timed on the device; on CPU
they are the aten operators' *self* CPU time (a parent operator's own time only, so no time is
counted twice). The categories come from the names by the first matching rule of ``RULES``, so
that the same table can be set beside the diffusers reference's: the DiT comparison shows which
kind of work one side does faster, e.g. where the time left once attention, which both sides run
through the same cuDNN kernel, is taken out.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from adm_megatron.bench.timing import synchronize

# (category, name fragments), lower case; the first rule with a fragment in the name wins
RULES = (
    ("attention", ("attention", "sdpa", "fmha", "flash", "softmax")),
    ("convolution", ("convolution", "conv2d", "conv3d", "implicit_gemm", "dgrad", "wgrad")),
    ("gemm", ("gemm", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "matmul")),
    ("normalization", ("norm",)),
    ("copy", ("memcpy", "memset", "copy_kernel", "aten::copy_", "aten::cat", "catarray", "aten::clone")),
)
CATEGORIES = (*(name for name, _ in RULES), "other")


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, fragments in RULES if any(f in low for f in fragments)), "other")


def _event_times(prof, cuda: bool) -> dict[str, tuple[float, int]]:
    """name -> (milliseconds, calls) of the events that do work: device kernels on a GPU, the
    operators' self CPU time on CPU."""
    out = {}
    for event in prof.key_averages():
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            micro = event.self_device_time_total
        else:
            micro = event.self_cpu_time_total
        if micro > 0:
            out[event.key] = (micro / 1000.0, event.count)
    return out


def profile_call(fn: Callable[[], object], device: torch.device, top: int = 10) -> dict:
    """One profiled call of ``fn``: the total time of its events, per category, and the ``top``
    heaviest event names (milliseconds, calls), with the call's wall-clock time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall_ms = 1000.0 * (time.perf_counter() - start)
    times = _event_times(prof, cuda)
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, (ms, _) in times.items():
        per_category[category(name)] += ms
    heaviest = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "events": "CUDA kernels, device time" if cuda else "aten operators, self CPU time",
        "total_ms": sum(ms for ms, _ in times.values()),  # <= wall_ms: nothing counted twice
        "wall_ms": wall_ms,  # the profiled call (the profiler's own overhead included)
        "categories_ms": per_category,
        "top": [{"name": name[:160], "category": category(name), "ms": ms, "calls": calls}
                for name, (ms, calls) in heaviest],
    }


def format_comparison(profiles: dict[str, dict]) -> str:
    """The categories of several profiles side by side (milliseconds, and each side's share)."""
    sides = list(profiles)
    lines = [f"{'kernels':<14}" + "".join(f"{side:>24}" for side in sides)]
    for cat in (*CATEGORIES, "total"):
        cells = []
        for side in sides:
            p = profiles[side]
            ms = p["total_ms"] if cat == "total" else p["categories_ms"][cat]
            cells.append(f"{ms:>14.2f} ms {100 * ms / max(p['total_ms'], 1e-12):>5.1f}%")
        lines.append(f"{cat:<14}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
