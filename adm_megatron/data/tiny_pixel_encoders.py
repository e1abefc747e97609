"""Tiny random SAM / DINOv2 vision encoders saved as local transformers directories (offline, < 1 s),
for ADP's pixel discriminator (heads/pixel.py) in tests and smoke runs (``tools/make_tiny_pipeline.py
--pixel-encoder``): 4 layers of width 32, 32x32 images, 8x8 patches, weights perturbed away from the
constructors' initialisation."""

from __future__ import annotations

import torch

LAYERS = 4


def make_tiny_encoder(kind: str, seed: int = 0, width: int = 32, image_size: int = 32):
    """``width`` channels on ``image_size``-pixel images (patches of 8, MLPs 2 x ``width``)."""
    from transformers import Dinov2Config, Dinov2Model, SamVisionConfig, SamVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "sam":
            model = SamVisionModel(SamVisionConfig(
                hidden_size=width, output_channels=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                image_size=image_size, patch_size=8, mlp_dim=2 * width, global_attn_indexes=[1, 3],
                window_size=2))
        else:
            model = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=LAYERS, num_attention_heads=2,
                                             intermediate_size=2 * width, image_size=image_size, patch_size=8))
        with torch.no_grad():  # SAM's constructor leaves its weights near zero: every layer would look alike
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_tiny_encoder(kind: str, directory: str, seed: int = 0, **sizes) -> str:
    make_tiny_encoder(kind, seed, **sizes).save_pretrained(directory)
    return directory
