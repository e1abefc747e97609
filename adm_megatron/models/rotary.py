"""The 3D rotary position embedding CogVideoX-5b is called with, as ``CogVideoXPipeline`` builds it.

The transformer itself takes ``image_rotary_emb`` as an argument; the trainer and the samplers need
the same (cos, sin) the diffusers pipeline would give, computed from the latent size alone.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from adm_megatron.models.cogvideox_config import CogVideoXArch


def cogvideox_rotary_emb(
    arch: CogVideoXArch, frames: int, latent_height: int, latent_width: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) [frames * h/p * w/p, head_dim] for latents of this size; None for sin-cos models."""
    if not arch.use_rotary_positional_embeddings:
        return None
    p = arch.patch_size
    grid = (latent_height // p, latent_width // p)
    crops = get_resize_crop_region_for_grid(grid, arch.sample_width // p, arch.sample_height // p)
    return get_3d_rotary_pos_embed(
        embed_dim=arch.attention_head_dim, crops_coords=crops, grid_size=grid,
        temporal_size=frames, device=device,
    )
