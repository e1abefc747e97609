"""Joint [text; video] self-attention of a CogVideoX block on megatron-core parallel layers.

Parts come from a ``ModuleSpec``: a fused-QKV ``linear_qkv`` (column parallel: heads split over
tensor-parallel ranks), per-head ``q_layernorm`` / ``k_layernorm``, a ``core_attention`` (SDPA or
Transformer Engine) and ``linear_proj`` (row parallel). The fused QKV weight is interleaved per
head, ``[q_h; k_h; v_h]`` for each head h, as in megatron's ``SelfAttention``.

Why not megatron's ``SelfAttention`` itself: it rotates every token with RoPE and, under context
parallelism, splits RoPE and the sequence for causal load balancing (or hands CP to Transformer
Engine). CogVideoX rotates only the video tokens, and its text tokens stay whole on every
context-parallel rank (as in NeMo's DiT), so this module owns those two steps:

- RoPE (CogVideoX-5b) on the video rows only, with diffusers' own ``apply_rotary_emb``: the model
  passes (cos, sin) with identity rows for the text (``with_identity_rows``), which leave those rows
  bit-equal.
- Context parallelism: each CP rank holds all text tokens and one contiguous slice of the video
  tokens. Keys and values of the video tokens are all-gathered over the CP group (megatron's
  ``gather_from_sequence_parallel_region`` on the CP group; its backward reduce-scatters dK / dV),
  and the rank's queries attend to the whole sequence. Transformer Engine's ``cp_comm_type``
  cannot be used for this: it shards every token of q / k / v, including the replicated text.

The builders of the fused QKV / output linears and per-head norms, ``project_qkv`` and the CP
gathers are shared with SD3's two-stream attention (``sd3_attention``); ``JointSelfAttention`` with no
text rows (``n_text=0``) is also SD3.5-Medium's image-only second attention (``attn2``).
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

from adm_megatron.models.rows import split_rows


@dataclass
class JointSelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


def with_identity_rows(rotary: tuple[torch.Tensor, torch.Tensor], n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The video rows' (cos, sin) [s_v, d] behind ``n_text`` rows of (1, 0): rotating by them leaves
    the text rows bit-equal (x * 1 + rot(x) * 0; diffusers rotates the video rows only), so the
    attention rotates its whole [text; video] sequence at once, with no per-segment split and cat."""
    cos, sin = rotary
    return (torch.cat([cos.new_ones(n_text, cos.shape[1]), cos]),
            torch.cat([sin.new_zeros(n_text, sin.shape[1]), sin]))


def rotate_rows(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """diffusers' CogVideoX RoPE on every row of x [s, b, h, d]; rotary = (cos, sin) [s, d] (see
    ``with_identity_rows`` for the text rows)."""
    return apply_rotary_emb(x.transpose(0, 1), rotary, sequence_dim=1).transpose(0, 1)


def gather_over_cp(x: torch.Tensor) -> torch.Tensor:
    """Each CP rank's slice of rows [s, ...] -> all rows [cp * s, ...]; backward reduce-scatters."""
    return gather_from_sequence_parallel_region(
        x.contiguous(), tensor_parallel_output_grad=True, group=parallel_state.get_context_parallel_group()
    )


def gather_video_over_cp(x: torch.Tensor, n_text: int) -> torch.Tensor:
    """[text; video slice] on each CP rank -> [text; all video], backward reduce-scatters."""
    text, video = split_rows(x, n_text)
    return torch.cat([text, gather_over_cp(video)], dim=0)


def build_qkv_linear(spec: Union[ModuleSpec, type], config: TransformerConfig) -> MegatronModule:
    """A fused-QKV column-parallel linear (hidden -> 3 x heads x head_dim, interleaved per head)."""
    return build_module(
        spec,
        config.hidden_size,
        3 * config.num_attention_heads * config.kv_channels,
        config=config,
        init_method=config.init_method,
        gather_output=False,
        bias=config.add_qkv_bias,
        skip_bias_add=False,
        is_expert=False,
        tp_comm_buffer_name="qkv",
    )


def build_proj_linear(spec: Union[ModuleSpec, type], config: TransformerConfig) -> MegatronModule:
    """The row-parallel attention output projection (heads x head_dim -> hidden)."""
    return build_module(
        spec,
        config.num_attention_heads * config.kv_channels,
        config.hidden_size,
        config=config,
        init_method=config.output_layer_init_method,
        bias=config.add_bias_linear,
        input_is_parallel=True,
        skip_bias_add=False,
        is_expert=False,
        tp_comm_buffer_name="proj",
    )


def build_head_norm(spec: Union[ModuleSpec, type, None], config: TransformerConfig):
    """A per-head q / k norm (eps 1e-6, as diffusers' attention), or None where the spec has none.
    Its weight is shared by all heads; megatron's ``finalize_model_grads`` sums its gradient over the
    tensor-parallel group by name (``q_layernorm`` / ``k_layernorm``), not by the SP tag."""
    if spec is None:
        return None
    return build_module(spec, config=config, hidden_size=config.kv_channels, eps=1e-6, sequence_parallel=False)


def project_qkv(linear_qkv, q_norm, k_norm, hidden_states: torch.Tensor, heads_local: int, head_dim: int):
    """Fused QKV projection -> per-head (normed) query, key, value, each [s, b, heads_local, d]."""
    mixed, _ = linear_qkv(hidden_states)
    s, b = mixed.shape[:2]
    query, key, value = mixed.view(s, b, heads_local, 3 * head_dim).split(head_dim, dim=-1)
    if q_norm is not None:
        query = q_norm(query)
    if k_norm is not None:
        key = k_norm(key)
    return query, key, value


class JointSelfAttention(MegatronModule):
    """Self-attention over the joint sequence; input / output [s, b, h] (s local under SP)."""

    def __init__(
        self, config: TransformerConfig, submodules: JointSelfAttentionSubmodules, layer_number: int
    ):
        super().__init__(config=config)
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // config.tensor_model_parallel_size
        self.linear_qkv = build_qkv_linear(submodules.linear_qkv, config)
        self.q_layernorm = build_head_norm(submodules.q_layernorm, config)
        self.k_layernorm = build_head_norm(submodules.k_layernorm, config)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number
        )
        self.linear_proj = build_proj_linear(submodules.linear_proj, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        n_text: int,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``n_text``: text tokens at the head of this CP rank's (SP-gathered) sequence; ``rotary``:
        (cos, sin) for every row of that sequence, text rows included (``with_identity_rows``)."""
        query, key, value = project_qkv(
            self.linear_qkv, self.q_layernorm, self.k_layernorm, hidden_states, self.heads_local, self.head_dim
        )
        if rotary is not None:
            query = rotate_rows(query, rotary)
            key = rotate_rows(key, rotary)
        if self.config.context_parallel_size > 1:
            key = gather_video_over_cp(key, n_text)
            value = gather_video_over_cp(value, n_text)
        out = self.core_attention(query, key, value)
        out, _ = self.linear_proj(out)
        return out
