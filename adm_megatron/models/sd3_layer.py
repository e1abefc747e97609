"""One SD3 / SD3.5 (MMDiT) transformer block as a megatron-core module built from a ``ModuleSpec``.

diffusers' ``JointTransformerBlock``: each stream (image, text) has its own adaLN-zero modulation
(``norm1`` / ``norm1_context``), joint attention (``sd3_attention``), a gated residual, then its own
LayerNorm (``norm2`` / ``norm2_context``, no affine) modulated by the MLP shift / scale, its own MLP
(``mlp`` / ``mlp_context``, tanh-GELU) and a gated residual. The last block is ``context_pre_only``:
its text stream has ``AdaLayerNormContinuous`` instead of adaLN-zero, and no text output, text norm
or text MLP. SD3.5-Medium's dual-attention blocks (``use_dual_attention``) add a second, image-only
self-attention (``attention2`` = diffusers' ``attn2``: CogVideoX's ``JointSelfAttention`` with no text
rows) modulated and gated by three more chunks of ``norm1``, after the joint attention's residual.

Every norm has no affine parameters and the config's ``layernorm_epsilon`` (1e-6, as diffusers').

Tokens are megatron's [s, b, h]: image tokens are this rank's sequence / context-parallel slice,
text tokens are whole on every rank (see ``sd3``). The text stream's modules are built with
``text_stream_config(config)`` (no sequence parallelism), so its linears are plain tensor parallel
and its modulation's gradient is not all-reduced over TP (every TP rank already holds all of it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.adaln import AdaLNContinuous, StreamAdaLNZero, modulate
from adm_megatron.models.norms import LayerNorm

def text_stream_config(config: TransformerConfig) -> TransformerConfig:
    """The config of the text stream's modules: the model's, without sequence parallelism."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)


@dataclass
class SD3LayerSubmodules:
    attention: Union[ModuleSpec, type] = None
    attention2: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


def _gated_mlp(hidden, norm, mlp, shift, scale, gate):
    """hidden + gate * mlp(modulate(norm(hidden), shift, scale))."""
    out, bias = mlp(modulate(norm(hidden), shift, scale))
    if bias is not None:
        out = out + bias
    return hidden + gate * out


class SD3Layer(MegatronModule):
    """A ``JointTransformerBlock``; names follow diffusers (``norm1``, ``norm1_context``) and
    megatron (``attention``, ``mlp``, ``mlp_context``) so the checkpoint mapping is a rename."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SD3LayerSubmodules,
        layer_number: int,
        context_pre_only: bool = False,
        use_dual_attention: bool = False,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        text_config = text_stream_config(config)
        hidden = config.hidden_size
        self.norm1 = StreamAdaLNZero(config, hidden, dual=use_dual_attention)
        if context_pre_only:
            self.norm1_context = AdaLNContinuous(text_config, hidden, elementwise_affine=False)
        else:
            self.norm1_context = StreamAdaLNZero(text_config, hidden)
        self.attention = build_module(
            submodules.attention, config=config, text_config=text_config, layer_number=layer_number,
            context_pre_only=context_pre_only,
        )
        if use_dual_attention:
            self.attention2 = build_module(submodules.attention2, config=config, layer_number=layer_number)
        self.norm2 = LayerNorm(config, hidden, elementwise_affine=False)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)
        if not context_pre_only:
            self.norm2_context = LayerNorm(text_config, hidden, elementwise_affine=False)
            self.mlp_context = build_module(
                submodules.mlp, config=text_config, ffn_hidden_size=config.ffn_hidden_size
            )

    def forward(self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor):
        """-> (image, text); text is None after a ``context_pre_only`` block."""
        normed, (gate, shift_mlp, scale_mlp, gate_mlp), *second = self.norm1(image, temb)
        if self.context_pre_only:
            normed_text = self.norm1_context(text, temb)
        else:
            normed_text, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(text, temb)
        attn, attn_text = self.attention(normed, normed_text)
        image = image + gate * attn
        if self.use_dual_attention:
            ((normed2, gate2),) = second
            image = image + gate2 * self.attention2(normed2, 0)
        image = _gated_mlp(image, self.norm2, self.mlp, shift_mlp, scale_mlp, gate_mlp)
        if self.context_pre_only:
            return image, None
        text = _gated_mlp(
            text + c_gate * attn_text, self.norm2_context, self.mlp_context, c_shift_mlp, c_scale_mlp, c_gate_mlp
        )
        return image, text
