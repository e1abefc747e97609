"""Parameter-name and layout mapping between diffusers' ``CogVideoXTransformer3DModel`` and
``adm_megatron``'s megatron-core CogVideoX (full, unsharded tensors on both sides).

Everything is a rename except attention: diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` become
megatron's fused ``linear_qkv``, interleaved per head ([q_h; k_h; v_h] for each head h), so that a
contiguous tensor-parallel shard of its rows is a whole group of heads.
"""

from __future__ import annotations

import re

import torch

# (megatron name inside a block, diffusers name inside a block); weights and biases alike.
_BLOCK_RENAMES = [
    ("norm1.linear", "norm1.linear"),
    ("norm1.norm", "norm1.norm"),
    ("norm2.linear", "norm2.linear"),
    ("norm2.norm", "norm2.norm"),
    ("self_attention.q_layernorm", "attn1.norm_q"),
    ("self_attention.k_layernorm", "attn1.norm_k"),
    ("self_attention.linear_proj", "attn1.to_out.0"),
    ("mlp.linear_fc1", "ff.net.0.proj"),
    ("mlp.linear_fc2", "ff.net.2"),
]
_GLOBAL_PREFIXES = [
    "patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1",
    "time_embedding.linear_2", "norm_final", "norm_out.linear", "norm_out.norm", "proj_out",
]
_QKV = "self_attention.linear_qkv"
_HF_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
_MEG_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[H*d, ...] x3 -> [H*3d, ...] interleaved per head."""
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))


def _is_megatron_extra(name: str) -> bool:
    return name.endswith("_extra_state")


def hf_to_megatron(hf: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """diffusers state dict -> megatron (full tensors). Unknown keys raise a one-line KeyError."""
    to_meg = {hf_name: meg for meg, hf_name in _BLOCK_RENAMES}
    out, qkv_parts = {}, {}
    for name, tensor in hf.items():
        block = _HF_BLOCK.match(name)
        if block:
            index, inner, kind = block.groups()
            if inner in _HF_QKV:
                qkv_parts.setdefault((index, kind), {})[inner] = tensor
                continue
            if inner not in to_meg:
                raise KeyError(f"diffusers tensor {name!r}: no megatron counterpart")
            out[f"blocks.{index}.{to_meg[inner]}.{kind}"] = tensor
        elif name.rsplit(".", 1)[0] in _GLOBAL_PREFIXES:
            out[name] = tensor
        else:
            raise KeyError(f"diffusers tensor {name!r}: no megatron counterpart")
    for (index, kind), parts in qkv_parts.items():
        missing = [n for n in _HF_QKV if n not in parts]
        if missing:
            raise KeyError(f"diffusers block {index}: {missing[0]}.{kind} is missing")
        out[f"blocks.{index}.{_QKV}.{kind}"] = fuse_qkv(*(parts[n] for n in _HF_QKV), num_heads)
    return out


def megatron_to_hf(meg: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """megatron state dict (full tensors) -> diffusers names and layout."""
    to_hf = dict(_BLOCK_RENAMES)
    out = {}
    for name, tensor in meg.items():
        if _is_megatron_extra(name):
            continue
        block = _MEG_BLOCK.match(name)
        if block:
            index, inner, kind = block.groups()
            prefix = f"transformer_blocks.{index}"
            if inner == _QKV:
                for hf_name, part in zip(_HF_QKV, split_qkv(tensor, num_heads)):
                    out[f"{prefix}.{hf_name}.{kind}"] = part.contiguous()
                continue
            if inner not in to_hf:
                raise KeyError(f"megatron tensor {name!r}: no diffusers counterpart")
            out[f"{prefix}.{to_hf[inner]}.{kind}"] = tensor
        elif name.rsplit(".", 1)[0] in _GLOBAL_PREFIXES:
            out[name] = tensor
        else:
            raise KeyError(f"megatron tensor {name!r}: no diffusers counterpart")
    return out
