"""Multi-head discriminator: one trainable head per tapped (frozen) backbone block.

``D_tau`` in ADM is the frozen teacher backbone plus these heads.  The backbone's feature taps
give a list of block outputs already reshaped to ``[B, C, H, W]`` (images, ``kind='2d'``) or
``[B, C, T, H, W]`` (video, ``kind='3d'``); :class:`MultiHeadDiscriminator` turns them into a
``[B, num_heads]`` logit matrix, reduced over heads by the losses in
:mod:`adm_megatron.algorithms.losses`.

Tap convention (:func:`adm_megatron.models.taps.tapped_block_indices`): **every k-th block counting from 1**, i.e. the
0-based block indices ``k-1, 2k-1, 3k-1, ...`` (the output of the last block of each group of
k).  CogVideoX-2b (30 blocks, k=3) -> 10 heads at blocks 2, 5, ..., 29; CogVideoX-5b (42, k=3)
-> 14 heads; SD3-Medium (24, k=1) -> 24 heads, SD3.5-Large (38, k=1) -> 38 heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adm_megatron.heads.head2d import DiscriminatorHead2D
from adm_megatron.heads.head3d import DiscriminatorHead3D

HEAD_KINDS = {"2d": (DiscriminatorHead2D, 4, "[B, C, H, W]"), "3d": (DiscriminatorHead3D, 5, "[B, C, T, H, W]")}


class MultiHeadDiscriminator(nn.Module):
    """An ``nn.ModuleList`` of 2D or 3D heads, one per tapped backbone block.

    Args:
        num_heads: number of heads (= number of tapped blocks, see :func:`tapped_block_indices`).
        in_channels: channels of every tapped feature (int), or one int per head.
        kind: ``'3d'`` (video features ``[B, C, T, H, W]``) or ``'2d'`` (image ``[B, C, H, W]``).
        **head_kwargs: passed to every head (``hidden_channels``, ``num_blocks``, ``max_groups``).

    ``forward(features, return_maps=False)``: ``features`` is a list of ``num_heads`` tensors in
    tap order; returns logits ``[B, num_heads]`` (column i from head i), or
    ``(logits, [map_0, ..., map_{n-1}])`` with ``return_maps=True``.  A wrong number of features,
    a wrong rank, channel count or batch size raises a one-line ``ValueError`` naming the index
    and the shapes.
    """

    def __init__(
        self,
        num_heads: int,
        in_channels: int | Sequence[int],
        kind: str = "3d",
        **head_kwargs,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"MultiHeadDiscriminator: num_heads must be >= 1, got {num_heads}")
        if kind not in HEAD_KINDS:
            raise ValueError(f"MultiHeadDiscriminator: kind must be '2d' or '3d', got {kind!r}")
        if isinstance(in_channels, int):
            channels = [in_channels] * num_heads
        else:
            channels = [int(c) for c in in_channels]
            if len(channels) != num_heads:
                raise ValueError(
                    f"MultiHeadDiscriminator: got {len(channels)} in_channels for {num_heads} heads"
                )
        head_cls, self._rank, self._layout = HEAD_KINDS[kind]
        self.kind = kind
        self.num_heads = num_heads
        self.in_channels = channels
        self.heads = nn.ModuleList(head_cls(c, **head_kwargs) for c in channels)

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != self.num_heads:
            raise ValueError(
                f"MultiHeadDiscriminator: got {len(features)} features for {self.num_heads} heads"
            )
        batch = None
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != self._rank or f.shape[1] != c:
                raise ValueError(
                    f"MultiHeadDiscriminator: feature {i} has shape {tuple(f.shape)}, expected "
                    f"{self._layout} with C={c} (kind={self.kind!r}, rank {self._rank})"
                )
            if batch is None:
                batch = f.shape[0]
            elif f.shape[0] != batch:
                raise ValueError(
                    f"MultiHeadDiscriminator: feature {i} has batch size {f.shape[0]} "
                    f"(shape {tuple(f.shape)}), feature 0 has {batch}"
                )

    def forward(self, features: Sequence[torch.Tensor], return_maps: bool = False):
        self._check(features)
        if return_maps:
            outs = [head(f, return_map=True) for head, f in zip(self.heads, features)]
            return torch.stack([o[0] for o in outs], dim=1), [o[1] for o in outs]
        return torch.stack([head(f) for head, f in zip(self.heads, features)], dim=1)
