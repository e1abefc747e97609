"""Joint attention of an SD3 (MMDiT) block on megatron-core parallel layers.

diffusers' ``Attention`` with ``JointAttnProcessor2_0``: the image and the text stream each have
their own fused QKV projection (``linear_qkv`` from ``to_q/to_k/to_v``, ``linear_added_qkv`` from
``add_q_proj/add_k_proj/add_v_proj``; column parallel, interleaved per head), their own per-head
q / k norms (RMSNorm in SD3.5, none in SD3-Medium), one attention over the joint [image; text]
sequence, and their own output projections (``linear_proj`` = ``to_out.0``, ``linear_added_proj``
= ``to_add_out``; row parallel). The last block is ``context_pre_only``: its text queries are
computed (diffusers has ``add_q_proj`` there too) but no text output is projected.

Token layout (see ``sd3``): image tokens [s, b, h] are this rank's slice (sequence parallel over TP
inside a CP rank's contiguous slice), text tokens [Lt, b, h] are whole on every rank. The image
stream's linears therefore run with the model's sequence parallelism (all-gather in, reduce-scatter
out) and the text stream's with ``text_config`` (no sequence parallelism: plain tensor parallel,
all-reduce out). Under context parallelism the image keys / values are all-gathered over the CP
group as in CogVideoX's ``JointSelfAttention`` (shared ``gather_over_cp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from adm_megatron.models.attention import (
    build_head_norm,
    build_proj_linear,
    build_qkv_linear,
    gather_over_cp,
    project_qkv,
)


@dataclass
class MMDiTAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_added_qkv: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type, None] = None
    k_layernorm: Union[ModuleSpec, type, None] = None
    added_q_layernorm: Union[ModuleSpec, type, None] = None
    added_k_layernorm: Union[ModuleSpec, type, None] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    linear_added_proj: Union[ModuleSpec, type] = None


class MMDiTAttention(MegatronModule):
    """Image [s, b, h] and text [Lt, b, h] in; image update [s, b, h] and text update (None when
    ``context_pre_only``) out."""

    def __init__(
        self,
        config: TransformerConfig,
        text_config: TransformerConfig,
        submodules: MMDiTAttentionSubmodules,
        layer_number: int,
        context_pre_only: bool = False,
    ):
        super().__init__(config=config)
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // config.tensor_model_parallel_size
        self.context_pre_only = context_pre_only
        self.linear_qkv = build_qkv_linear(submodules.linear_qkv, config)
        self.linear_added_qkv = build_qkv_linear(submodules.linear_added_qkv, text_config)
        self.q_layernorm = build_head_norm(submodules.q_layernorm, config)
        self.k_layernorm = build_head_norm(submodules.k_layernorm, config)
        self.added_q_layernorm = build_head_norm(submodules.added_q_layernorm, config)
        self.added_k_layernorm = build_head_norm(submodules.added_k_layernorm, config)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number
        )
        self.linear_proj = build_proj_linear(submodules.linear_proj, config)
        self.linear_added_proj = (
            None if context_pre_only else build_proj_linear(submodules.linear_added_proj, text_config)
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        heads, d = self.heads_local, self.head_dim
        q_img, k_img, v_img = project_qkv(self.linear_qkv, self.q_layernorm, self.k_layernorm, image, heads, d)
        q_txt, k_txt, v_txt = project_qkv(
            self.linear_added_qkv, self.added_q_layernorm, self.added_k_layernorm, text, heads, d
        )
        if self.config.context_parallel_size > 1:
            k_img, v_img = gather_over_cp(k_img), gather_over_cp(v_img)
        num_image = q_img.shape[0]  # this CP rank's image tokens (gathered over SP by linear_qkv)
        out = self.core_attention(
            torch.cat([q_img, q_txt]), torch.cat([k_img, k_txt]), torch.cat([v_img, v_txt])
        )
        image_out, _ = self.linear_proj(out[:num_image])
        if self.context_pre_only:
            return image_out, None
        text_out, _ = self.linear_added_proj(out[num_image:])
        return image_out, text_out
