"""2D discriminator head for image backbones (SD3 / SD3.5 MMDiT, SDXL UNet).

One head reads one tapped backbone block output, reshaped to an image feature map
``[B, C, H, W]`` (for a DiT: the token grid ``H = height / patch``, ``W = width / patch``), and
returns one realness logit per sample.

Architecture (ADM paper, 2D head)::

    x [B, C, H, W]
    -> num_blocks x ( Conv2d 4x4, stride 2, padding 1 -> GroupNorm -> SiLU )   # H, W -> n // 2
    -> Conv2d 1x1 (hidden -> 1)                                               # logit map [B, 1, h, w]
    -> mean over (h, w)                                                       # logit [B]

Decisions
---------
* **Small inputs.**  A 4x4 / stride 2 / padding 1 convolution maps a size ``n`` to ``n // 2``.  A
  block halves a spatial dimension only while the result keeps at least ``min_size`` pixels
  (default 2); along a dimension that is already smaller than ``2 * min_size`` it runs the *same*
  weights with stride 1 and "same" padding (1 before, 2 after), keeping the size.  So the head
  accepts any ``H, W >= 1`` (tiny test models have 2x2..4x4 token grids), never downsamples below
  1 pixel, and every block — hence every parameter — is used at every input size (no
  size-dependent module set: one head serves all resolutions and aspect ratios, and all its
  parameters always get gradients).  ``min_size=2`` rather than 1 because GroupNorm over a
  1x1 map with one channel per group (widths <= 32, i.e. tiny models) normalises single values:
  its output would be the constant bias, the logit would not depend on the input and no gradient
  would flow.  Real token grids (e.g. 30x45, 64x64) are halved by every block as usual.
  Caveat: a 1x1 *input* still hits that degenerate case when each group holds one channel
  (``hidden_channels <= 32``); use a wider head for such inputs.
* **GroupNorm groups**: the largest divisor of the channel count that is <= 32
  (:func:`~adm_megatron.heads.common.group_norm_groups`); 32 for every real width.
* The per-sample logit is the **mean** of the logit map, so its scale does not depend on the
  resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adm_megatron.heads.common import ConvHead, make_group_norm


class DownBlock2D(nn.Module):
    """Conv2d(4x4, stride 2, padding 1) -> GroupNorm -> SiLU; keeps too-small dimensions."""

    def __init__(
        self, in_channels: int, out_channels: int, max_groups: int = 32, min_size: int = 2
    ):
        super().__init__()
        self.min_size = min_size
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
        self.norm = make_group_norm(out_channels, max_groups)
        self.act = nn.SiLU()

    @staticmethod
    def out_size(n: int, min_size: int = 2) -> int:
        """Output size along one dimension of input size ``n``."""
        return n // 2 if n // 2 >= min_size else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        down_h, down_w = h // 2 >= self.min_size, w // 2 >= self.min_size
        if down_h and down_w:
            x = self.conv(x)  # ordinary path: (h, w) -> (h // 2, w // 2)
        else:
            # Same weights; stride 1 with "same" padding (1, 2) along a dimension too small to
            # halve, stride 2 with padding (1, 1) along the others.
            sh, ph = (2, (1, 1)) if down_h else (1, (1, 2))
            sw, pw = (2, (1, 1)) if down_w else (1, (1, 2))
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
            x = F.conv2d(x, self.conv.weight, self.conv.bias, stride=(sh, sw))
        return self.act(self.norm(x))


class DiscriminatorHead2D(ConvHead):
    """Per-sample realness logit from one ``[B, C, H, W]`` backbone feature map.

    Args:
        in_channels: channels ``C`` of the tapped feature (the backbone hidden size).
        hidden_channels: width of every block (default 256).
        num_blocks: number of 4x4 / stride-2 blocks (default 2, >= 1).
        max_groups: upper bound on GroupNorm groups (default 32).
        min_size: a block halves a dimension only if the result has >= ``min_size`` pixels, else
            keeps its size (default 2, >= 1; see the module docstring).

    ``forward(x, return_map=False)`` returns the logits ``[B]``, or ``(logits [B], map [B, h, w])``
    when ``return_map`` is true.
    """

    block_class = DownBlock2D
    logit_conv = nn.Conv2d
    rank = 4
    layout = "[B, C, H, W]"

    @staticmethod
    def output_size(h: int, w: int, num_blocks: int, min_size: int = 2) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the logit map for an ``h x w`` input."""
        for _ in range(num_blocks):
            h, w = DownBlock2D.out_size(h, min_size), DownBlock2D.out_size(w, min_size)
        return h, w
