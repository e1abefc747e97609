"""3D discriminator head for video backbones (CogVideoX).

One head reads one tapped backbone block output, reshaped to a video feature map
``[B, C, T, H, W]`` (latent frames x token grid), and returns one realness logit per sample.

Architecture (ADM paper, 3D head)::

    x [B, C, T, H, W]
    -> num_blocks x ( Conv3d 3x3x3, stride 1, padding 1                 # C -> hidden, mixes time
                      -> Conv2d 3x3, stride 2, padding 1, per frame      # H, W -> ceil(n/2)
                      -> GroupNorm -> SiLU )
    -> Conv3d 1x1x1 (hidden -> 1)                                        # logit map [B, 1, T, h, w]
    -> mean over (T, h, w)                                               # logit [B]

Decisions
---------
* The per-frame 2D convolution is stored as an ``nn.Conv2d`` (weight ``[out, in, 3, 3]``) and run
  as a ``(1, 3, 3)`` 3D convolution (its weight unsqueezed at the time axis) with stride
  ``(1, 2, 2)`` (see small inputs below): exactly "the 2D conv applied to each frame", without
  reshaping to ``B*T`` frames.
* **Small inputs.**  A 3x3 / stride 2 / padding 1 convolution maps ``n`` to ``ceil(n / 2)``.  As in
  the 2D head, a block halves H or W only while the result keeps at least ``min_size`` pixels
  (default 2); a smaller dimension gets stride 1 (padding 1 keeps its size).  So any
  ``T, H, W >= 1`` works, the map never drops below 1 pixel, every parameter is used at every
  size, and GroupNorm never sees a 1x1 map made from a larger one (with one channel per group,
  i.e. widths <= 32, it would normalise single values at T = 1 and the logit would be constant).
  T is never downsampled.
* **GroupNorm groups**: the largest divisor of the channel count that is <= 32
  (:func:`~adm_megatron.heads.common.group_norm_groups`); 32 for every real width.  GroupNorm
  statistics are taken over (channels in group, T, H, W).
* The per-sample logit is the **mean** of the logit map (independent of clip length and size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adm_megatron.heads.common import ConvHead, make_group_norm


class DownBlock3D(nn.Module):
    """Conv3d(3x3x3, s1, p1) -> per-frame Conv2d(3x3, s2, p1) -> GroupNorm -> SiLU."""

    def __init__(
        self, in_channels: int, out_channels: int, max_groups: int = 32, min_size: int = 2
    ):
        super().__init__()
        self.min_size = min_size
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv2d = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = make_group_norm(out_channels, max_groups)
        self.act = nn.SiLU()

    @staticmethod
    def out_size(n: int, min_size: int = 2) -> int:
        """Output size along H or W for input size ``n``."""
        return (n + 1) // 2 if (n + 1) // 2 >= min_size and n >= 2 else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(x)
        h, w = x.shape[-2:]
        sh = 2 if self.out_size(h, self.min_size) != h else 1
        sw = 2 if self.out_size(w, self.min_size) != w else 1
        # per-frame 2D conv == 3D conv with a (1, 3, 3) kernel and stride (1, sh, sw)
        x = F.conv3d(
            x, self.conv2d.weight.unsqueeze(2), self.conv2d.bias, stride=(1, sh, sw), padding=(0, 1, 1)
        )
        return self.act(self.norm(x))


class DiscriminatorHead3D(ConvHead):
    """Per-sample realness logit from one ``[B, C, T, H, W]`` backbone feature map.

    Args:
        in_channels: channels ``C`` of the tapped feature (the backbone hidden size).
        hidden_channels: width of every block (default 256).
        num_blocks: number of (3D conv + strided 2D conv) blocks (default 2, >= 1).
        max_groups: upper bound on GroupNorm groups (default 32).
        min_size: a block halves H or W only if the result has >= ``min_size`` pixels, else
            keeps its size (default 2, >= 1; see the module docstring).

    ``forward(x, return_map=False)`` returns the logits ``[B]``, or
    ``(logits [B], map [B, T, h, w])`` when ``return_map`` is true.
    """

    block_class = DownBlock3D
    logit_conv = nn.Conv3d
    rank = 5
    layout = "[B, C, T, H, W]"

    @staticmethod
    def output_size(
        t: int, h: int, w: int, num_blocks: int, min_size: int = 2
    ) -> tuple[int, int, int]:
        """Size ``(t, h, w)`` of the logit map for a ``t x h x w`` input (T is kept)."""
        for _ in range(num_blocks):
            h, w = DownBlock3D.out_size(h, min_size), DownBlock3D.out_size(w, min_size)
        return t, h, w
