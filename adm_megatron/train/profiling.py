"""``logging.profile``: a window of iterations profiled, as Megatron-LM's ``--profile``.

Iterations ``start`` .. ``end - 1`` are profiled on the global ``ranks`` listed. ``mode: torch``
runs ``torch.profiler`` over the window (CPU and, on a GPU, CUDA activity; with ``memory: true``
also every allocation and the tensor shapes) and writes one Chrome trace per rank,
``output_dir/profile/rank{R}-iter{start}-{end}.json`` (open it in Perfetto or chrome://tracing), when
the window closes -- or, cut short, when the run stops. ``mode: nsys`` calls
``cudaProfilerStart`` / ``cudaProfilerStop`` around the window, for ``nsys profile
--capture-range=cudaProfilerApi``. In both, each iteration and each of its phases is a named range
(``iteration N``, ``phase/fake_score`` ...; NVTX ranges on a GPU), so the trace shows where an
iteration's time goes.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from adm_megatron.config import ConfigError, ProfileConfig


def check_profile(config: ProfileConfig | None, world_size: int, device: torch.device) -> None:
    """One-line ConfigError for a window this launch cannot profile (before anything is built)."""
    if config is None:
        return
    outside = [r for r in config.ranks if r >= world_size]
    if outside:
        raise ConfigError(f"logging.profile.ranks={config.ranks}: rank(s) {outside} outside a world of {world_size}")
    if config.mode == "nsys" and device.type != "cuda":
        raise ConfigError("logging.profile.mode=nsys: needs a GPU (cudaProfilerStart); use mode=torch on CPU")


@contextlib.contextmanager
def _named_range(name: str, cuda: bool):
    with record_function(name):
        if cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()


class IterationProfiler:
    def __init__(self, config: ProfileConfig | None, rank: int, device: torch.device, output_dir: str):
        self.config = config if config is not None and rank in config.ranks else None
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.output_dir = output_dir
        self._profile = None
        self._running = False

    def path(self) -> str:
        c = self.config
        return os.path.join(self.output_dir, "profile", f"rank{self.rank}-iter{c.start:07d}-{c.end:07d}.json")

    def wrap_phases(self, run):
        """``PhaseRunner.run`` with each phase a named range (only when this rank profiles)."""
        if self.config is None:
            return run

        def named_run(phase, *args, **kwargs):
            with _named_range(f"phase/{phase}", self.cuda):
                return run(phase, *args, **kwargs)

        return named_run

    @contextlib.contextmanager
    def iteration(self, iteration: int):
        """Around one training iteration: starts the window at ``start``, closes it after ``end - 1``."""
        c = self.config
        if c is None or not c.start <= iteration < c.end:
            yield
            return
        if not self._running:
            self._begin()
        with _named_range(f"iteration {iteration}", self.cuda):
            yield
        if iteration == c.end - 1:
            self.close()

    def _begin(self) -> None:
        if self.config.mode == "nsys":
            torch.cuda.cudart().cudaProfilerStart()
        else:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            memory = self.config.memory
            self._profile = profile(activities=activities, profile_memory=memory, record_shapes=memory)
            self._profile.__enter__()
        self._running = True

    def close(self) -> None:
        """End the window (if open) and write its trace; the run's end or stop calls it too."""
        if not self._running:
            return
        self._running = False
        if self.config.mode == "nsys":
            torch.cuda.cudart().cudaProfilerStop()
            return
        self._profile.__exit__(None, None, None)
        path = self.path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._profile.export_chrome_trace(f"{path}.partial")
        os.replace(f"{path}.partial", path)
        self._profile = None
