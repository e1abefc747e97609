"""Random draws that depend on the global batch, not on how it is split over data-parallel ranks.

Every draw is made for the whole global batch from one seeded generator (the same on every rank)
and each rank keeps its own rows, so a run with DP = 2 and a per-rank batch of 1 draws exactly what
one process with a batch of 2 draws. The extra cost is drawing a few latent-sized tensors per phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.diffusion.guidance import sample_guidance_scales


@dataclass
class BatchRandom:
    generator: torch.Generator
    global_batch: int
    rows: slice  # this rank's rows of the global batch

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` (this rank's rows)."""
        shape = (self.global_batch, *like.shape[1:])
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=like.dtype)
        return noise[self.rows].to(like.device)

    def randint(self, low: int, high: int, device) -> torch.Tensor:
        """One integer in [low, high) per sample of this rank."""
        draw = torch.randint(low, high, (self.global_batch,), generator=self.generator, device=self.generator.device)
        return draw[self.rows].to(device)

    def rand(self, device) -> torch.Tensor:
        """One float64 uniform on [0, 1) per sample of this rank."""
        draw = torch.rand(self.global_batch, generator=self.generator, device=self.generator.device,
                          dtype=torch.float64)
        return draw[self.rows].to(device)

    def guidance_scales(self, scale_range: tuple[float, float], device) -> torch.Tensor:
        """One CFG scale per sample of this rank, uniform on ``scale_range``."""
        return sample_guidance_scales(self.global_batch, scale_range, self.generator)[self.rows].to(device)

    def shared_randint(self, low: int, high: int) -> int:
        """One integer in [low, high] inclusive for the whole global batch."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator, device=self.generator.device))
