"""Parameter-name and layout mapping between diffusers' ``CogVideoXTransformer3DModel`` and
``adm_megatron``'s megatron-core CogVideoX (full, unsharded tensors on both sides).

Everything is a rename except attention: diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` become
megatron's fused ``linear_qkv``, interleaved per head (see ``key_mapping``).
"""

from __future__ import annotations

from adm_megatron.convert.key_mapping import KeyMapping

MAPPING = KeyMapping(
    block_renames=(
        ("norm1.linear", "norm1.linear"),
        ("norm1.norm", "norm1.norm"),
        ("norm2.linear", "norm2.linear"),
        ("norm2.norm", "norm2.norm"),
        ("self_attention.q_layernorm", "attn1.norm_q"),
        ("self_attention.k_layernorm", "attn1.norm_k"),
        ("self_attention.linear_proj", "attn1.to_out.0"),
        ("mlp.linear_fc1", "ff.net.0.proj"),
        ("mlp.linear_fc2", "ff.net.2"),
    ),
    fused_qkv=(("self_attention.linear_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),),
    global_prefixes=(
        "patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1",
        "time_embedding.linear_2", "norm_final", "norm_out.linear", "norm_out.norm", "proj_out",
    ),
)


# diffusers state dict -> megatron (full tensors), and back; unknown keys raise a one-line KeyError
hf_to_megatron = MAPPING.hf_to_megatron
megatron_to_hf = MAPPING.megatron_to_hf
