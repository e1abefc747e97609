"""A scope in which megatron-core's literal ``device='cuda'`` allocations land on the CPU.

A few megatron-core functions the trainer calls allocate small bookkeeping tensors with a literal
``device='cuda'`` (the token counter in ``forward_backward_no_pipelining``, the norm buffers of
``optimizer.clip_grads.get_grad_norm_fp32``). The CPU shim cannot redirect a device string, so on a
machine without CUDA these calls run inside ``cpu_device_scope()``: a ``TorchFunctionMode`` that
rewrites a CUDA ``device`` argument to the CPU. With CUDA present the scope does nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cpu_device_scope():
    """Context manager: CUDA device arguments become CPU ones when CUDA is unavailable."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCpu()
