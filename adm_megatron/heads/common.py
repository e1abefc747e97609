"""What the 2D and 3D discriminator heads share: GroupNorm sizing, input checks, and the head body
(validated widths, a stack of down blocks, a 1x1 logit convolution, the mean logit)."""

from __future__ import annotations

import torch
from torch import nn


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups used for ``channels`` feature channels.

    The paper's heads use GroupNorm(32).  GroupNorm needs ``channels % groups == 0``, which
    fails for the tiny test models (8 or 16 channels) and for any width that is not a multiple
    of 32, so the rule is: **the largest divisor of ``channels`` that is <= ``max_groups``**.
    For every width that is a multiple of 32 (all real backbones: 1536, 1920, 2432, 3072, and
    the default head width 256) this is exactly 32; for 16 channels it is 16, for 48 it is 24,
    for a prime width above 32 it is 1 (LayerNorm-like).
    """
    if channels < 1:
        raise ValueError(f"group_norm_groups: channels must be >= 1, got {channels}")
    if max_groups < 1:
        raise ValueError(f"group_norm_groups: max_groups must be >= 1, got {max_groups}")
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 divides everything


def make_group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """``nn.GroupNorm`` over ``channels`` with :func:`group_norm_groups` groups (affine)."""
    return nn.GroupNorm(group_norm_groups(channels, max_groups), channels, eps=eps, affine=True)


def check_feature(x: torch.Tensor, in_channels: int, rank: int, layout: str, where: str) -> None:
    """Raise a one-line ``ValueError`` unless ``x`` has ``rank`` dims and ``in_channels`` at dim 1."""
    if x.dim() != rank or x.shape[1] != in_channels:
        raise ValueError(
            f"{where}: expected a feature of shape {layout} with C={in_channels} "
            f"(rank {rank}), got shape {tuple(x.shape)}"
        )


class ConvHead(nn.Module):
    """A head body: ``num_blocks`` down blocks, a 1x1 convolution to a logit map, its mean.

    Subclasses set ``block_class`` (a down block taking ``(in, out, max_groups, min_size)``),
    ``logit_conv`` (``nn.Conv2d`` / ``nn.Conv3d``), the input ``rank`` and its ``layout`` text.
    """

    block_class: type
    logit_conv: type
    rank: int
    layout: str

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 256,
        num_blocks: int = 2,
        max_groups: int = 32,
        min_size: int = 2,
    ):
        super().__init__()
        name = type(self).__name__
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(
                f"{name}: channels must be >= 1, got in_channels={in_channels}, "
                f"hidden_channels={hidden_channels}"
            )
        if num_blocks < 1:
            raise ValueError(f"{name}: num_blocks must be >= 1, got {num_blocks}")
        if min_size < 1:
            raise ValueError(f"{name}: min_size must be >= 1, got {min_size}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_blocks = num_blocks
        self.min_size = min_size
        chans = [in_channels] + [hidden_channels] * num_blocks
        self.blocks = nn.ModuleList(
            self.block_class(chans[i], chans[i + 1], max_groups, min_size) for i in range(num_blocks)
        )
        self.to_logit = self.logit_conv(hidden_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        check_feature(x, self.in_channels, self.rank, self.layout, type(self).__name__)
        for block in self.blocks:
            x = block(x)
        logit_map = self.to_logit(x).squeeze(1)  # [B, (T,) h, w]
        logits = logit_map.flatten(1).mean(dim=1)  # [B]
        return (logits, logit_map) if return_map else logits
