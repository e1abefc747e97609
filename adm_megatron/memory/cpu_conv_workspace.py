"""The CPU's transient memory of a discriminator head's first convolution backward, measured.

It depends on the machine, not on a formula: torch runs a float32 convolution through oneDNN
when the batch is above 1 (its native ``slow_conv3d`` / ``slow_conv2d`` otherwise), and oneDNN
picks its algorithm by the CPU's instruction set -- on AVX-512 a direct kernel with a small
scratchpad, on AVX2 (e.g. AMD EPYC) a GEMM over an im2col buffer the size of the unfolded input;
the native path unfolds the input and keeps per-thread weight-gradient buffers. So the planner's
CPU count (``Settings.device='cpu'``, the one that is checked against measured CPU runs) runs that
convolution once at the run's shapes under torch's memory profiler. GPU plans never call this:
cuDNN's workspace is left to the margin.
"""

from __future__ import annotations

import functools

import torch

from adm_megatron.memory.measure import peak_during


@functools.lru_cache(maxsize=None)
def conv_backward_workspace(kind: str, in_channels: int, out_channels: int, batch: int, size: tuple[int, ...],
                            threads: int) -> int:
    """Peak bytes a head's first conv backward (``kind`` '3d': Conv3d 3x3x3 s1 p1 on
    ``[batch, in, T, H, W]``; '2d': Conv2d 4x4 s2 p1 on ``[batch, in, H, W]``) allocates beyond the
    weight and bias gradients it returns, with ``threads`` intra-op threads; its input is a
    detached feature (no input gradient), as in the discriminator phase."""
    conv = (torch.nn.Conv3d(in_channels, out_channels, 3, padding=1) if kind == "3d"
            else torch.nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1))
    x = torch.randn(batch, in_channels, *size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = conv(x)
        grad = torch.ones_like(y)
        peak = peak_during(lambda: torch.autograd.grad(y, [conv.weight, conv.bias], grad))
    finally:
        torch.set_num_threads(before)
    return max(0, peak - sum(p.numel() * p.element_size() for p in conv.parameters()))
