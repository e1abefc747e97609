"""The networks of one distillation run as diffusion-math callables.

``DiTFunction`` turns a (possibly DDP-wrapped, possibly parallel) megatron backbone of any model
family into ``fn(x_t, t, cond) -> model output`` with the latent size's positional inputs attached,
plus ``features`` for a discriminator backbone. ``cond`` is the prompt embedding [B, L, D], or a
:class:`TextCondition` when the family also takes a pooled text embedding (SD3).
``Networks`` holds the four roles of ADM's Algorithm 1: the frozen teacher (real score and ADM's
discriminator backbone, one set of weights), the fake score (DMD2's classifier backbone), the
generator and the discriminator heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class TextCondition(NamedTuple):
    """A prompt embedding with its pooled embedding (families that take one, such as SD3)."""

    text: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, Dp]


def text_condition(text: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor | TextCondition:
    """What ``DiTFunction`` is called with: the bare embedding when there is no pooled one."""
    return text if pooled is None else TextCondition(text, pooled)


class DiTFunction:
    """A diffusion transformer called as ``fn(x_t, t [B], cond)``; ``rotary`` is what the family's
    ``positional_inputs`` gave for the latent size (diffusers' ``image_rotary_emb``), or None for
    backbones that embed positions themselves."""

    def __init__(self, module: torch.nn.Module, rotary=None):
        self.module = module
        self.rotary = rotary

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond, **kwargs):
        text, pooled = (cond.text, cond.pooled) if isinstance(cond, TextCondition) else (cond, None)
        if self.rotary is not None:
            kwargs["image_rotary_emb"] = self.rotary
        if pooled is not None:
            kwargs["pooled_projections"] = pooled
        return self.module(hidden_states=x_t, encoder_hidden_states=text, timestep=t, **kwargs)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self._call(x_t, t, cond).sample

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond, every: int):
        """The tapped block outputs, each [B, hidden, (T,) h, w] as the family's head kind reads them."""
        return self._call(x_t, t, cond, return_features=True, feature_every=every).features


@dataclass
class Networks:
    teacher: DiTFunction  # frozen: real score (with CFG) and ADM's discriminator backbone
    fake_score: DiTFunction | None  # None for a method without one (ADP)
    generator: DiTFunction
    heads: torch.nn.Module | None  # MultiHeadDiscriminator (possibly DDP-wrapped); None without one
    head_every: int
    pixel: torch.nn.Module | None = None  # ADP's frozen pixel backbone (heads/pixel.py PixelFeatures)

    def discriminator(self, backbone: DiTFunction, x: torch.Tensor, t: torch.Tensor, cond):
        """Logits [B, heads]: the heads on ``backbone``'s tapped features of (x, t)."""
        return self.heads(backbone.features(x, t, cond, self.head_every))
