"""What the DiT families (CogVideoX, SD3) share in reading their configurations: the diffusers
``config.json`` of a model directory, and the megatron-core ``TransformerConfig`` of the blocks for one
parallel layout.

Both families use bias-carrying linears, a non-gated tanh-GELU MLP and megatron's parallel settings in
the same way; each family's ``make_transformer_config`` passes its architecture's sizes here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def read_config_json(path: str) -> tuple[dict[str, Any], str]:
    """(config dict, its file path) of a diffusers model directory; one-line error if it has none."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no diffusers config.json in this directory")
    with open(config_path) as f:
        return json.load(f), config_path


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def dit_transformer_config(
    *,
    num_layers: int,
    num_attention_heads: int,
    head_dim: int,
    ffn_hidden_size: int,
    bias: bool,
    norm_eps: float,
    qk_layernorm: bool,
    dropout: float = 0.0,
    tensor_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    recompute: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
) -> TransformerConfig:
    """``qk_layernorm`` also makes megatron's ``finalize_model_grads`` sum the per-head q / k norm
    gradients over tensor-parallel ranks (by the parameter names ``q_layernorm`` / ``k_layernorm``)."""
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=num_attention_heads * head_dim,
        num_attention_heads=num_attention_heads,
        kv_channels=head_dim,
        ffn_hidden_size=ffn_hidden_size,
        add_bias_linear=bias,
        add_qkv_bias=bias,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        layernorm_epsilon=norm_eps,
        qk_layernorm=qk_layernorm,
        hidden_dropout=dropout,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
    )
