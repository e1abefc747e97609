"""A diffusers <-> megatron parameter mapping (full, unsharded tensors on both sides), described by
tables: per-block renames, per-block fused QKV groups, and global names kept as they are.

Everything is a rename except attention: diffusers' separate q / k / v projections become megatron's
fused QKV linear, interleaved per head ([q_h; k_h; v_h] for each head h), so that a contiguous
tensor-parallel shard of its rows is a whole group of heads. Each family (``cogvideox_mapping``,
``sd3_mapping``) is one ``KeyMapping``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_MEG_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[H*d, ...] x3 -> [H*3d, ...] interleaved per head."""
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))


@dataclass(frozen=True)
class KeyMapping:
    """``block_renames``: (megatron name, diffusers name) inside a block, weights and biases alike;
    ``fused_qkv``: (megatron fused name, (diffusers q, k, v names)) inside a block;
    ``global_prefixes``: module names outside the blocks, the same on both sides;
    ``hf_blocks``: the diffusers name of the block list (megatron's is ``blocks``)."""

    block_renames: tuple[tuple[str, str], ...]
    fused_qkv: tuple[tuple[str, tuple[str, str, str]], ...]
    global_prefixes: tuple[str, ...]
    hf_blocks: str = "transformer_blocks"

    def _is_global(self, name: str) -> bool:
        return name.rsplit(".", 1)[0] in self.global_prefixes

    def hf_to_megatron(self, hf: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
        """diffusers state dict -> megatron (full tensors). Unknown keys raise a one-line KeyError."""
        to_meg = {hf_name: meg for meg, hf_name in self.block_renames}
        fused_of = {part: meg for meg, parts in self.fused_qkv for part in parts}
        hf_block = re.compile(rf"^{re.escape(self.hf_blocks)}\.(\d+)\.(.+)\.(weight|bias)$")
        out, qkv_parts = {}, {}
        for name, tensor in hf.items():
            block = hf_block.match(name)
            if block:
                index, inner, kind = block.groups()
                if inner in fused_of:
                    qkv_parts.setdefault((index, fused_of[inner], kind), {})[inner] = tensor
                    continue
                if inner not in to_meg:
                    raise KeyError(f"diffusers tensor {name!r}: no megatron counterpart")
                out[f"blocks.{index}.{to_meg[inner]}.{kind}"] = tensor
            elif self._is_global(name):
                out[name] = tensor
            else:
                raise KeyError(f"diffusers tensor {name!r}: no megatron counterpart")
        hf_parts = dict(self.fused_qkv)
        for (index, meg, kind), parts in qkv_parts.items():
            missing = [n for n in hf_parts[meg] if n not in parts]
            if missing:
                raise KeyError(f"diffusers block {index}: {missing[0]}.{kind} is missing")
            out[f"blocks.{index}.{meg}.{kind}"] = fuse_qkv(*(parts[n] for n in hf_parts[meg]), num_heads)
        return out

    def megatron_to_hf(self, meg: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
        """megatron state dict (full tensors) -> diffusers names and layout."""
        to_hf = dict(self.block_renames)
        hf_parts = dict(self.fused_qkv)
        out = {}
        for name, tensor in meg.items():
            if name.endswith("_extra_state"):
                continue
            block = _MEG_BLOCK.match(name)
            if block:
                index, inner, kind = block.groups()
                prefix = f"{self.hf_blocks}.{index}"
                if inner in hf_parts:
                    for hf_name, part in zip(hf_parts[inner], split_qkv(tensor, num_heads)):
                        out[f"{prefix}.{hf_name}.{kind}"] = part.contiguous()
                    continue
                if inner not in to_hf:
                    raise KeyError(f"megatron tensor {name!r}: no diffusers counterpart")
                out[f"{prefix}.{to_hf[inner]}.{kind}"] = tensor
            elif self._is_global(name):
                out[name] = tensor
            else:
                raise KeyError(f"megatron tensor {name!r}: no diffusers counterpart")
        return out
