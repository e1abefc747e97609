"""Parameter-name and layout mapping between diffusers' ``SD3Transformer2DModel`` and
``adm_megatron``'s megatron-core SD3 (full, unsharded tensors on both sides).

Everything is a rename except attention: each stream's separate q / k / v projections (image
``to_q/to_k/to_v``, text ``add_q_proj/add_k_proj/add_v_proj``) become one fused, per-head interleaved
QKV linear (see ``key_mapping``). The last (``context_pre_only``) block simply has no
``to_add_out`` / ``ff_context`` tensors; SD3.5-Medium's dual-attention blocks add ``attn2`` (fused
the same way). ``pos_embed.pos_embed`` is diffusers' persistent sin-cos
buffer, carried as it is.
"""

from __future__ import annotations

from adm_megatron.convert.key_mapping import KeyMapping

MAPPING = KeyMapping(
    block_renames=(
        ("norm1.linear", "norm1.linear"),
        ("norm1_context.linear", "norm1_context.linear"),
        ("attention.q_layernorm", "attn.norm_q"),
        ("attention.k_layernorm", "attn.norm_k"),
        ("attention.added_q_layernorm", "attn.norm_added_q"),
        ("attention.added_k_layernorm", "attn.norm_added_k"),
        ("attention.linear_proj", "attn.to_out.0"),
        ("attention.linear_added_proj", "attn.to_add_out"),
        ("attention2.q_layernorm", "attn2.norm_q"),
        ("attention2.k_layernorm", "attn2.norm_k"),
        ("attention2.linear_proj", "attn2.to_out.0"),
        ("mlp.linear_fc1", "ff.net.0.proj"),
        ("mlp.linear_fc2", "ff.net.2"),
        ("mlp_context.linear_fc1", "ff_context.net.0.proj"),
        ("mlp_context.linear_fc2", "ff_context.net.2"),
    ),
    fused_qkv=(
        ("attention.linear_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("attention.linear_added_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ("attention2.linear_qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ),
    global_prefixes=(
        "pos_embed", "pos_embed.proj", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2", "context_embedder", "norm_out.linear", "proj_out",
    ),
)


# diffusers state dict -> megatron (full tensors), and back; unknown keys raise a one-line KeyError
hf_to_megatron = MAPPING.hf_to_megatron
megatron_to_hf = MAPPING.megatron_to_hf
