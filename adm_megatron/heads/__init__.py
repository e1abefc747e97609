"""Discriminator heads on tapped backbone features (ADM's ``D_tau`` minus the frozen backbone)."""

from adm_megatron.heads.common import group_norm_groups
from adm_megatron.heads.head2d import DiscriminatorHead2D
from adm_megatron.heads.head3d import DiscriminatorHead3D
from adm_megatron.heads.multi_head import MultiHeadDiscriminator
from adm_megatron.models.taps import tapped_block_indices

__all__ = [
    "DiscriminatorHead2D",
    "DiscriminatorHead3D",
    "MultiHeadDiscriminator",
    "group_norm_groups",
    "tapped_block_indices",
]
