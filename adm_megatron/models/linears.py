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
On one tensor-parallel rank the whole ``forward`` is ``F.linear``: megatron's forward otherwise
wraps the product in its identity ``copy_to`` / ``reduce_from`` region functions (Python autograd
nodes that do nothing at TP = 1) and adds a row-parallel layer's bias after the GEMM.

Parameters, names, sharding and checkpoints are megatron's: only ``forward`` / ``_forward_impl``
differ, and only where the call needs nothing of megatron's. There, ``fp8_gemm`` (set by
``models/fp8_torchao.enable_local_fp8`` for torchao's ``model.fp8`` recipes) replaces ``F.linear``
with the same product in FP8.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear as _MegatronColumn
from megatron.core.tensor_parallel.layers import RowParallelLinear as _MegatronRow
from megatron.core.utils import get_pg_size


def _communicates(kwargs: dict) -> bool:
    return bool(
        kwargs.get("allreduce_dgrad")
        or kwargs.get("sequence_parallel")
        or kwargs.get("gradient_accumulation_fusion")
        or kwargs.get("grad_output_buffer") is not None
    )


class LocalWhenAlone:
    """``forward`` as ``F.linear`` on one tensor-parallel rank when megatron's forward would add
    nothing but identity regions: no expert / deferred-wgrad / activation-offloading machinery, no
    fused gradient accumulation, the layer's own weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8_gemm = None  # F.linear's product in FP8 (models/fp8_torchao.py), or None: F.linear
        # what holds for the layer's whole life, set once (not a functools.cached_property: on
        # Python < 3.12 its lock is a graph break for torch.compile, model.compile=blocks)
        self._one_plain_rank = (
            get_pg_size(self.tp_group) == 1
            and not self.is_expert
            and not self.gradient_accumulation_fusion
            and not self.config.defer_embedding_wgrad_compute
        )

    def _alone(self, weight) -> bool:
        return (
            weight is None
            and self._one_plain_rank
            and getattr(self.config, "_cpu_offloading_context", None) is None
        )

    def _linear(self, input, weight, bias):
        return F.linear(input, weight, bias) if self.fp8_gemm is None else self.fp8_gemm(input, weight, bias)

    def forward(self, input_, weight=None, **kwargs):
        if not self._alone(weight):
            return super().forward(input_, **({} if weight is None else {"weight": weight}), **kwargs)
        if self.skip_bias_add:
            return self._linear(input_, self.weight, None), self.bias
        return self._linear(input_, self.weight, self.bias), None

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args or _communicates(kwargs):
            return super()._forward_impl(input, weight, *args, **kwargs)
        return self._linear(input, weight, kwargs.get("bias"))


class ColumnParallelLinear(LocalWhenAlone, _MegatronColumn):
    """megatron's ``ColumnParallelLinear``; ``F.linear`` when the call communicates nothing."""


class RowParallelLinear(LocalWhenAlone, _MegatronRow):
    """megatron's ``RowParallelLinear``; on one TP rank all of it as ``F.linear``, else its local
    product as ``F.linear`` (the TP reduction and the bias stay megatron's, after it)."""
