"""The networks of one distillation run as diffusion-math callables.

``DiTFunction`` turns a (possibly DDP-wrapped, possibly parallel) megatron CogVideoX into
``fn(x_t, t, text) -> velocity`` with the latent size's RoPE attached, plus ``features`` for a
discriminator backbone. ``Networks`` holds the four roles of ADM's Algorithm 1: the frozen teacher
(real score and ADM's discriminator backbone, one set of weights), the fake score (DMD2's
classifier backbone), the generator and the discriminator heads; ADP adds its frozen pixel backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DiTFunction:
    """A diffusion transformer called as ``fn(x_t [B,F,C,H,W], t [B], text [B,L,D])``."""

    def __init__(self, module: torch.nn.Module, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        self.module = module
        self.rotary = rotary

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.module(x_t, text, t, image_rotary_emb=self.rotary).sample

    def features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, every: int):
        """The tapped block outputs, each [B, hidden, F, h, w]."""
        return self.module(
            x_t, text, t, image_rotary_emb=self.rotary, return_features=True, feature_every=every
        ).features


@dataclass
class Networks:
    teacher: DiTFunction  # frozen: real score (with CFG) and ADM's discriminator backbone
    fake_score: DiTFunction | None  # None for a method without one (ADP)
    generator: DiTFunction
    heads: torch.nn.Module | None  # MultiHeadDiscriminator (possibly DDP-wrapped); None without one
    head_every: int
    pixel: torch.nn.Module | None = None  # ADP's frozen pixel backbone (heads/pixel.py PixelFeatures)

    def discriminator(self, backbone: DiTFunction, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """Logits [B, heads]: the heads on ``backbone``'s tapped features of (x, t)."""
        return self.heads(backbone.features(x, t, text, self.head_every))
