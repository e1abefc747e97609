"""The CPU's transient memory of a discriminator head's first convolution, measured.

It depends on the machine, not on a formula: torch runs a float32 convolution through oneDNN
when the batch is above 1 (its native ``slow_conv3d`` / ``slow_conv2d`` otherwise), and oneDNN
picks its algorithm by the CPU's instruction set -- on AVX-512 a direct kernel with a small
scratchpad, on AVX2 (e.g. AMD EPYC) a GEMM over an im2col buffer the size of the unfolded input;
the native path unfolds the input (in the forward too, and in a backward into the input: at
batch 1 the frozen heads of the generator phase hold an im2col buffer of 27 x their input) and
keeps per-thread weight-gradient buffers. So the planner's CPU count (``Settings.device='cpu'``,
the one that is checked against measured CPU runs) runs that convolution once at the run's shapes
under torch's memory profiler. GPU plans never call this: cuDNN's workspace is left to the margin.
"""

from __future__ import annotations

import functools

import torch

from adm_megatron.memory.measure import peak_during


@functools.lru_cache(maxsize=None)
def conv_workspace(kind: str, in_channels: int, out_channels: int, batch: int, size: tuple[int, ...],
                   threads: int, grad: str = "weights") -> int:
    """Peak bytes a head's first conv (``kind`` '3d': Conv3d 3x3x3 s1 p1 on ``[batch, in, T, H, W]``;
    '2d': Conv2d 4x4 s2 p1 on ``[batch, in, H, W]``) allocates in its forward or its backward beyond
    the output and the gradients the backward returns, with ``threads`` intra-op threads. ``grad``:
    'weights', a trainable head on a detached feature (the discriminator phase: weight and bias
    gradients), or 'input', a frozen head back-propagating into its feature (the generator phase)."""
    conv = (torch.nn.Conv3d(in_channels, out_channels, 3, padding=1) if kind == "3d"
            else torch.nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1))
    conv.requires_grad_(grad == "weights")
    x = torch.randn(batch, in_channels, *size, requires_grad=grad == "input")
    wrt = [x] if grad == "input" else [conv.weight, conv.bias]
    outputs = []
    forward = peak_during(lambda: outputs.append(conv(x)), threads)
    y = outputs.pop()
    grad_y = torch.ones_like(y)
    backward = peak_during(lambda: torch.autograd.grad(y, wrt, grad_y), threads)
    return max(0, forward - _bytes(y), backward - sum(_bytes(t) for t in wrt))


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
