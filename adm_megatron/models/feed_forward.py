"""The DiT feed-forward on megatron-core parallel linears: fc1 (column parallel) -> activation ->
fc2 (row parallel), parameter names as megatron's ``MLP`` (``linear_fc1``, ``linear_fc2``).

Why not megatron's ``MLP``: it builds fc1 with ``skip_bias_add=True`` and adds the bias in a pass of
its own before the activation (kept apart for its CUDA bias-activation fusion, which CogVideoX's
tanh-GELU does not use here). This module keeps fc1's bias in its GEMM (``addmm`` through
``models.linears``) and adds fc2's bias after its reduction, as megatron's row layer does by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class FeedForwardSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class FeedForward(MegatronModule):
    """[s, b, h] -> [s, b, h]; returns ``(output, None)`` like megatron's ``MLP`` (bias included)."""

    def __init__(self, config: TransformerConfig, submodules: FeedForwardSubmodules, ffn_hidden_size: int):
        super().__init__(config=config)
        common = dict(config=config, bias=config.add_bias_linear, skip_bias_add=False, is_expert=False)
        self.linear_fc1 = build_module(
            submodules.linear_fc1, config.hidden_size, ffn_hidden_size, init_method=config.init_method,
            gather_output=False, tp_comm_buffer_name="fc1", **common,
        )
        self.activation_func = config.activation_func
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn_hidden_size, config.hidden_size,
            init_method=config.output_layer_init_method, input_is_parallel=True, tp_comm_buffer_name="fc2",
            **common,
        )

    def forward(self, hidden_states: torch.Tensor):
        intermediate, _ = self.linear_fc1(hidden_states)
        output, _ = self.linear_fc2(self.activation_func(intermediate))
        return output, None
