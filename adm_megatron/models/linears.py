"""megatron-core's tensor-parallel linears, run as one ``torch.nn.functional.linear`` where a call
needs no communication.

megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` compute through
``LinearWithGradAccumulationAndAsyncCommunication``, a Python autograd function: a matmul, then a
separate bias add, and a Python backward that reshapes before its weight-gradient GEMM. Where the
call communicates nothing -- a column-parallel layer on one tensor-parallel rank, or any
row-parallel layer's local product (its reduction runs after ``_forward_impl``), without sequence
parallelism, fused gradient accumulation or deferred weight gradients -- it computes exactly
``F.linear``, which torch runs with the bias inside the GEMM (``addmm``) and a C++ backward.
Measured on CPU at the bench size this closed half the gap between our DiT and diffusers'
(docs/PERFORMANCE.md). Every other call -- TP > 1 column layers (their input-gradient
all-reduce), sequence parallelism (the all-gather inside), ``gradient_accumulation_fusion`` (the
CUDA wgrad-into-``main_grad`` kernel) -- goes to megatron's own path unchanged, and so does a call
whose arguments this module does not recognise (a newer megatron-core passing them positionally).
Parameters, names, sharding and checkpoints are megatron's: only ``_forward_impl`` differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear as _MegatronColumn
from megatron.core.tensor_parallel.layers import RowParallelLinear as _MegatronRow


def _communicates(kwargs: dict) -> bool:
    return bool(
        kwargs.get("allreduce_dgrad")
        or kwargs.get("sequence_parallel")
        or kwargs.get("gradient_accumulation_fusion")
        or kwargs.get("grad_output_buffer") is not None
    )


def _linear_or_megatron(megatron_impl, input: torch.Tensor, weight: torch.Tensor, args: tuple, kwargs: dict):
    if args or _communicates(kwargs):
        return megatron_impl(input, weight, *args, **kwargs)
    return F.linear(input, weight, kwargs.get("bias"))


class ColumnParallelLinear(_MegatronColumn):
    """megatron's ``ColumnParallelLinear``; ``F.linear`` when the call communicates nothing."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _linear_or_megatron(super()._forward_impl, input, weight, args, kwargs)


class RowParallelLinear(_MegatronRow):
    """megatron's ``RowParallelLinear``; its local product as ``F.linear`` (the TP reduction and
    the bias stay megatron's, after it)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _linear_or_megatron(super()._forward_impl, input, weight, args, kwargs)
