"""Attention cores: the softmax(QK^T)V kernel that ``JointSelfAttention`` calls.

Layout in and out is megatron's ``sbhd``: q [sq, b, h, d], k / v [skv, b, h, d] -> [sq, b, h*d].
Full (non-causal) attention, no mask: CogVideoX attends jointly over all text and video tokens.

- ``SDPACoreAttention``: ``torch.nn.functional.scaled_dot_product_attention``, which picks the
  flash / cuDNN / memory-efficient kernel on a GPU and the math kernel on CPU. It is the local spec's
  core and needs nothing but torch.
- ``TECoreAttention`` (in ``te_spec``) wraps megatron-core's ``TEDotProductAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Scaled dot-product attention over sbhd tensors."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config=config)
        self.layer_number = layer_number

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        sq, b, h, d = query.shape
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)
