"""Transformer Engine attention core (imported only where TE and CUDA are present).

A thin adapter from ``JointSelfAttention``'s call (q, k, v in sbhd, no mask) to megatron-core's
``TEDotProductAttention``. Context parallelism is done by ``JointSelfAttention`` (text kept whole on
every CP rank), so the core is built with a config whose ``context_parallel_size`` is 1: TE sees one
rank's queries against the gathered keys / values.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class TECoreAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config=config)
        local = dataclasses.replace(config, context_parallel_size=1)
        self.attention = TEDotProductAttention(
            config=local,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask,
            attention_type="self",
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = self.attention(query, key, value, None, AttnMaskType.no_mask)
        return out.reshape(query.shape[0], query.shape[1], -1)
