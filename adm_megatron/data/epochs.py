"""Epochs over a data set as a pure function of (seed, iteration): what the prompt sampler and the
ODE-pair sampler draw from.

The items ``range(n)`` form an endless stream of epochs, each a permutation drawn from a generator
seeded by ``(seed, epoch, *key)`` (``key`` tells two streams of one run apart). Iteration ``i``
consumes stream positions ``[i G, (i + 1) G)`` with ``G`` the global batch, cut into slots as
``adm_megatron.data.batch_layout`` says (rank ``r``'s micro-batch ``m`` takes slot ``m dp_size + r``).
So every item is seen once per epoch, the ranks and micro-batches of one iteration draw different
items (unless ``G`` exceeds ``n`` or the batch straddles two epochs), and ``indices(i, m)`` depends
only on ``(seed, key, i, m, layout)``: no state to checkpoint, an exact resume. The global batch (all
slots' indices in slot order) depends only on ``(seed, key, i, G)``, not on how ``G`` is split over
ranks and micro-batches.
"""

from __future__ import annotations

import torch

from adm_megatron.data.batch_layout import BatchLayout


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochStream:
    def __init__(self, n: int, layout: BatchLayout, seed: int, key: tuple[int, ...] = ()):
        if n < 1:
            raise ValueError("EpochStream: the data set (prompts, ODE pairs) is empty")
        self.n = n
        self.layout = layout
        self.seed = seed
        self.key = key
        self._epochs: dict[int, torch.Tensor] = {}  # the last two (a batch may straddle them)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, *self.key))
            self._epochs[epoch] = torch.randperm(self.n, generator=g)
        return self._epochs[epoch]

    def indices(self, iteration: int, micro: int = 0) -> torch.Tensor:
        """This rank's ``[micro_batch]`` item indices for ``iteration`` (>= 0), micro-batch ``micro``."""
        if iteration < 0:
            raise ValueError(f"EpochStream: iteration must be >= 0, got {iteration}")
        rows = self.layout.rows(micro)
        start = iteration * self.layout.global_batch
        return torch.stack([self._permutation(p // self.n)[p % self.n]
                            for p in range(start + rows.start, start + rows.stop)])
