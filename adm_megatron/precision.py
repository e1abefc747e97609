"""Numerics switches shared by the GPU checks and tests."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp32_highest():
    """Full-precision fp32 matmuls and convolutions (no TF32) inside the block.

    Only the legacy switches (``allow_tf32``) are used: torch >= 2.9 raises when the legacy getters
    are read after the new ``fp32_precision`` switches made cuDNN's conv and RNN flags differ."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
