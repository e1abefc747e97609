"""One CogVideoX transformer block as a megatron-core module built from a ``ModuleSpec``.

diffusers' ``CogVideoXBlock``: adaLN-zero (``norm1``) -> joint self-attention -> gated residual,
adaLN-zero (``norm2``) -> MLP over [text; video] -> gated residual, with separate modulation for
text and video tokens. Tokens are megatron's [s, b, h] (s is this rank's slice under sequence or
context parallelism); which rows are text is given by ``TokenLayout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class TokenLayout:
    """Where the text tokens are in this rank's slices of the joint [text; video] sequence.

    ``text_local``: text rows at the head of the rank's sequence-parallel slice (what the norms and
    the MLP see). ``text_attention``: text rows at the head of the sequence the attention sees
    (the sequence-parallel slices gathered back, i.e. this CP rank's [text; video slice]).
    """

    text_local: int
    text_attention: int


@dataclass
class CogVideoXLayerSubmodules:
    adaln: Union[ModuleSpec, type] = None
    self_attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class CogVideoXLayer(MegatronModule):
    """A CogVideoX block; parameter names follow megatron (``self_attention``, ``mlp``) and
    diffusers (``norm1``, ``norm2``) so the checkpoint mapping stays a plain rename."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: CogVideoXLayerSubmodules,
        layer_number: int,
        time_embed_dim: int,
        norm_elementwise_affine: bool = True,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.norm1 = build_module(
            submodules.adaln, config=config, cond_dim=time_embed_dim,
            elementwise_affine=norm_elementwise_affine,
        )
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.norm2 = build_module(
            submodules.adaln, config=config, cond_dim=time_embed_dim,
            elementwise_affine=norm_elementwise_affine,
        )
        self.mlp = build_module(
            submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        layout: TokenLayout,
        rotary_cos: torch.Tensor | None = None,
        rotary_sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rotary = None if rotary_cos is None else (rotary_cos, rotary_sin)
        normed, gated_residual = self.norm1(hidden_states, temb, layout.text_local)
        attn = self.self_attention(normed, layout.text_attention, rotary)
        hidden_states = gated_residual(hidden_states, attn)

        normed, gated_residual = self.norm2(hidden_states, temb, layout.text_local)
        mlp_out, mlp_bias = self.mlp(normed)
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        return gated_residual(hidden_states, mlp_out)
