"""Normalisation modules for the DiT blocks.

megatron-core's local ``WrappedTorchNorm`` refuses sequence parallelism, so the DiTs use these thin
subclasses of ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` whose parameters carry megatron's
``sequence_parallel`` tag: under sequence parallelism each tensor-parallel rank normalises only its
slice of tokens, and ``finalize_model_grads`` then sums the tagged gradients over the
tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def _tag_sequence_parallel(norm: torch.nn.Module, config: TransformerConfig, sequence_parallel: bool | None):
    tag = config.sequence_parallel if sequence_parallel is None else sequence_parallel
    for param in norm.parameters():
        setattr(param, "sequence_parallel", tag)


class LayerNorm(torch.nn.LayerNorm):
    """LayerNorm whose weights are tagged for megatron's sequence-parallel gradient all-reduce."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        sequence_parallel: bool | None = None,
    ):
        super().__init__(
            hidden_size,
            eps=config.layernorm_epsilon if eps is None else eps,
            elementwise_affine=elementwise_affine,
            dtype=config.params_dtype,
        )
        _tag_sequence_parallel(self, config, sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm (x / rms(x) * weight, diffusers' ``RMSNorm`` in fp32) with the same weight tagging."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float | None = None,
        sequence_parallel: bool | None = None,
    ):
        super().__init__(
            hidden_size, eps=config.layernorm_epsilon if eps is None else eps, dtype=config.params_dtype
        )
        _tag_sequence_parallel(self, config, sequence_parallel)
