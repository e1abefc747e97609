"""Joint [text; video] self-attention of a CogVideoX block on megatron-core parallel layers.

Parts come from a ``ModuleSpec``: a fused-QKV ``linear_qkv`` (column parallel: heads split over
tensor-parallel ranks), per-head ``q_layernorm`` / ``k_layernorm``, a ``core_attention`` (SDPA or
Transformer Engine) and ``linear_proj`` (row parallel). The fused QKV weight is interleaved per
head, ``[q_h; k_h; v_h]`` for each head h, as in megatron's ``SelfAttention``.

Why not megatron's ``SelfAttention`` itself: it rotates every token with RoPE and, under context
parallelism, splits RoPE and the sequence for causal load balancing (or hands CP to Transformer
Engine). CogVideoX rotates only the video tokens, and its text tokens stay whole on every
context-parallel rank (as in NeMo's DiT), so this module owns those two steps:

- RoPE (CogVideoX-5b) on the video rows only, with diffusers' own ``apply_rotary_emb``.
- Context parallelism: each CP rank holds all text tokens and one contiguous slice of the video
  tokens. Keys and values of the video tokens are all-gathered over the CP group (megatron's
  ``gather_from_sequence_parallel_region`` on the CP group; its backward reduce-scatters dK / dV),
  and the rank's queries attend to the whole sequence. Transformer Engine's ``cp_comm_type``
  cannot be used for this: it shards every token of q / k / v, including the replicated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from diffusers.models.embeddings import apply_rotary_emb
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class JointSelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


def rotate_video_rows(x: torch.Tensor, n_text: int, rotary: tuple[torch.Tensor, torch.Tensor]):
    """diffusers' CogVideoX RoPE on rows [n_text:] of x [s, b, h, d]; rotary = (cos, sin) [s_v, d]."""
    video = apply_rotary_emb(x[n_text:].transpose(0, 1), rotary, sequence_dim=1).transpose(0, 1)
    return torch.cat([x[:n_text], video], dim=0)


def gather_video_over_cp(x: torch.Tensor, n_text: int) -> torch.Tensor:
    """[text; video slice] on each CP rank -> [text; all video], backward reduce-scatters."""
    cp_group = parallel_state.get_context_parallel_group()
    video = gather_from_sequence_parallel_region(
        x[n_text:].contiguous(), tensor_parallel_output_grad=True, group=cp_group
    )
    return torch.cat([x[:n_text], video], dim=0)


class JointSelfAttention(MegatronModule):
    """Self-attention over the joint sequence; input / output [s, b, h] (s local under SP)."""

    def __init__(
        self, config: TransformerConfig, submodules: JointSelfAttentionSubmodules, layer_number: int
    ):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp
        hidden = config.hidden_size
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            hidden,
            3 * config.num_attention_heads * self.head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
        )
        self.q_layernorm = build_module(
            submodules.q_layernorm, config=config, hidden_size=self.head_dim, eps=1e-6,
            sequence_parallel=False,
        )
        self.k_layernorm = build_module(
            submodules.k_layernorm, config=config, hidden_size=self.head_dim, eps=1e-6,
            sequence_parallel=False,
        )
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.num_attention_heads * self.head_dim,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="proj",
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        n_text: int,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``n_text``: text tokens at the head of this CP rank's (SP-gathered) sequence."""
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, self.heads_local, 3 * self.head_dim)
        query, key, value = mixed.split(self.head_dim, dim=-1)
        query = self.q_layernorm(query)
        key = self.k_layernorm(key)
        if rotary is not None:
            query = rotate_video_rows(query, n_text, rotary)
            key = rotate_video_rows(key, n_text, rotary)
        if self.config.context_parallel_size > 1:
            key = gather_video_over_cp(key, n_text)
            value = gather_video_over_cp(value, n_text)
        out = self.core_attention(query, key, value)
        out, _ = self.linear_proj(out)
        return out
