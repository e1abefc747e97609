"""Random draws that depend on the global batch, not on how it is split over data-parallel ranks
and micro-batches.

Every draw is made for the whole global batch from one seeded generator (the same on every rank)
and each of this rank's micro-batches keeps its own rows (``adm_megatron.data.batch_layout``), so a
run with DP = 2 and a per-rank batch of 1 draws exactly what one process with a batch of 2, or with
two micro-batches of 1, draws. ``PhaseDraws`` holds one phase's draws in one iteration: the n-th
draw of every micro-batch is made once, when the first micro-batch asks for it, and only this
rank's rows of it are kept. The extra cost is drawing a few global-batch, latent-sized tensors per
phase.
"""

from __future__ import annotations

from typing import Callable

import torch

from adm_megatron.data.batch_layout import BatchLayout
from adm_megatron.diffusion.guidance import sample_guidance_scales


class PhaseDraws:
    """One phase's draws in one iteration for all of this rank's micro-batches."""

    def __init__(self, generator: torch.Generator, layout: BatchLayout):
        self.generator = generator
        self.layout = layout
        self._made: list[tuple[tuple, object]] = []  # per draw: (what was drawn, rows per micro-batch | value)

    def micro(self, micro: int = 0) -> BatchRandom:
        """The draws of micro-batch ``micro`` (its rows of each global draw, in order)."""
        self.layout.slot(micro)  # in range
        return BatchRandom(self, micro)

    def take(self, index: int, micro: int, what: tuple, draw: Callable[[int], object]):
        """Micro-batch ``micro``'s part of draw number ``index``; ``draw(global_batch)`` makes it."""
        if index == len(self._made):
            value = draw(self.layout.global_batch)
            if isinstance(value, torch.Tensor):  # keep only this rank's rows (copies: the rest is freed)
                value = [value[self.layout.rows(m)].clone() for m in range(self.layout.microbatches)]
            self._made.append((what, value))
        made, value = self._made[index]
        if made != what:
            raise RuntimeError(f"micro-batch {micro} draw {index} is {what}, an earlier micro-batch's was {made}: "
                               "the sequence of draws must not depend on a micro-batch's data")
        return value[micro] if isinstance(value, list) else value


class BatchRandom:
    """The draws of one micro-batch of this rank: its rows of the phase's global draws."""

    def __init__(self, phase: PhaseDraws, micro: int = 0):
        self.phase = phase
        self.micro = micro
        self._count = 0

    def _take(self, what: tuple, draw: Callable[[int], object]):
        value = self.phase.take(self._count, self.micro, what, draw)
        self._count += 1
        return value

    @property
    def _generator(self) -> torch.Generator:
        return self.phase.generator

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` (this micro-batch's rows)."""
        g, tail = self._generator, tuple(like.shape[1:])
        noise = self._take(("randn", tail, like.dtype),
                           lambda n: torch.randn((n, *tail), generator=g, device=g.device, dtype=like.dtype))
        return noise.to(like.device)

    def randint(self, low: int, high: int, device) -> torch.Tensor:
        """One integer in [low, high) per sample."""
        g = self._generator
        return self._take(("randint", low, high),
                          lambda n: torch.randint(low, high, (n,), generator=g, device=g.device)).to(device)

    def rand(self, device) -> torch.Tensor:
        """One float64 uniform on [0, 1) per sample."""
        g = self._generator
        return self._take(("rand",), lambda n: torch.rand(n, generator=g, device=g.device,
                                                          dtype=torch.float64)).to(device)

    def guidance_scales(self, scale_range: tuple[float, float], device) -> torch.Tensor:
        """One CFG scale per sample, uniform on ``scale_range``."""
        scale_range = tuple(scale_range)
        return self._take(("guidance", scale_range),
                          lambda n: sample_guidance_scales(n, scale_range, self._generator)).to(device)

    def shared_randint(self, low: int, high: int) -> int:
        """One integer in [low, high] inclusive for the whole global batch."""
        g = self._generator
        return self._take(("shared_randint", low, high),
                          lambda n: int(torch.randint(low, high + 1, (1,), generator=g, device=g.device)))
