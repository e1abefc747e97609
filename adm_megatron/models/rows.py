"""Splitting a [s, ...] token tensor into its leading rows and the rest (the text and video parts of
a joint [text; video] sequence).

``torch.split`` rather than two slices: the backward of ``x[:n]`` and ``x[n:]`` allocates a zero
tensor of x's full size per slice, copies the slice's gradient into it and adds the two, while the
backward of one split is a single ``cat`` of the parts' gradients. On CPU the slices cost about 1%
of a CogVideoX block's forward + backward (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch


def split_rows(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x[:n], x[n:]) along dim 0, as one autograd node."""
    head, tail = x.split([n, x.shape[0] - n], dim=0)
    return head, tail
