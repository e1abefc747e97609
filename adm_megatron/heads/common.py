"""Small helpers shared by the discriminator heads (no models here)."""

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
