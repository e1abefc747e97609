"""Tiny random SD3 / SD3.5 teachers (diffusers directories) and inputs shared by the SD3 model tests."""

from __future__ import annotations

import torch

from tiny_cogvideox import perturbed_model, saved_once

# sample_size 16 (8 x 8 patches) inside a 12 x 12 position grid: latents of other sizes crop it
TINY_SD3_MEDIUM = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
    pos_embed_max_size=12,
)
TINY_SD35 = dict(TINY_SD3_MEDIUM, attention_head_dim=16, caption_projection_dim=64, qk_norm="rms_norm")
# SD3.5-Medium-style: dual attention (a second, image-only attention), here also in the last block
TINY_SD35_MEDIUM = dict(TINY_SD35, dual_attention_layers=(0, 2))
VARIANTS = {"sd3": TINY_SD3_MEDIUM, "sd35": TINY_SD35, "sd35m": TINY_SD35_MEDIUM}
TEXT_TOKENS = 7  # odd on purpose: the text stream is never split over ranks


def make_diffusers_model(variant: str, seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    return perturbed_model(SD3Transformer2DModel, {**VARIANTS[variant], **overrides}, seed)


def save_diffusers_model(variant: str, directory: str, seed: int = 0, **overrides) -> str:
    return saved_once(lambda: make_diffusers_model(variant, seed, **overrides), f"tiny-{variant}-{seed}", directory)


def make_inputs(config, batch: int, height: int, width: int, seed: int = 1):
    """(latents, text, pooled, timestep, loss weight) for a model config (diffusers or SD3Arch)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, height, width, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    weight = torch.randn(batch, config.out_channels, height, width, generator=g)
    return latents, text, pooled, timestep, weight
