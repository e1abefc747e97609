"""Attention cores: the softmax(QK^T)V kernel that ``JointSelfAttention`` calls.

Layout in and out is megatron's ``sbhd``: q [sq, b, h, d], k / v [skv, b, h, d] -> [sq, b, h*d].
Full (non-causal) attention, no mask: CogVideoX attends jointly over all text and video tokens.

- ``SDPACoreAttention``: ``torch.nn.functional.scaled_dot_product_attention`` with the kernel its
  ``backend`` names (``models.attention_backend``: torch's own choice by default, one SDPA backend,
  or ``auto``, the fastest timed); ``set_attention_backend`` sets it on a whole model. It is the
  local spec's core and needs nothing but torch.
- ``TECoreAttention`` (in ``te_core_attention``) wraps megatron-core's ``TEDotProductAttention``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.attention_backend import ATTENTION_BACKENDS, sdpa


class SDPACoreAttention(MegatronModule):
    """Scaled dot-product attention over sbhd tensors."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.backend = "default"  # see models.attention_backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        sq, b, h, d = query.shape
        out = sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), self.backend)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    """Every SDPA core of ``model`` computes with ``backend`` (``te`` and a TE core: nothing to set,
    the spec chose it; ``check_backend`` refused the mismatches before the model was built)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    for module in model.modules():
        if isinstance(module, SDPACoreAttention):
            if backend == "te":
                raise ValueError("attention backend te: this model has the local spec's SDPA attention")
            module.backend = backend
