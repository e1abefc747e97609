"""Exact per-rank sizes of the networks of an ADM run, from models built on the ``meta`` device.

The CogVideoX backbone is built once (tensor parallel 1) on ``meta`` -- no memory, no weights -- and
each parameter is counted whole or as ``1 / TP`` of itself, as megatron-core's
``tensor_model_parallel`` tag on it says (column / row parallel weights and biases are split, norms,
adaLN, embeddings and the output projection are replicated). The discriminator heads are plain
torch modules, replicated on every rank. Buffers (the 2b's sin-cos position table) are counted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.models.cogvideox_config import CogVideoXArch


@dataclass(frozen=True)
class NetworkSize:
    params: int  # parameter elements held by one rank
    largest_param: int  # elements of the largest parameter tensor on one rank
    buffer_bytes: int  # bytes of the module's buffers on one rank (as built, fp32)


def _size(module: torch.nn.Module, tensor_parallel: int) -> NetworkSize:
    per_rank = [
        p.numel() // tensor_parallel if getattr(p, "tensor_model_parallel", False) else p.numel()
        for p in module.parameters()
    ]
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return NetworkSize(params=sum(per_rank), largest_param=max(per_rank), buffer_bytes=buffers)


def backbone_size(arch: CogVideoXArch, tensor_parallel: int) -> NetworkSize:
    """One CogVideoX (teacher, fake score or generator) as one rank of ``tensor_parallel`` holds it."""
    from adm_megatron.models import build_model

    return _size(build_model(arch, device="meta"), tensor_parallel)


def heads_size(arch: CogVideoXArch, num_heads: int, hidden: int, blocks: int) -> NetworkSize:
    """The multi-head discriminator (3D heads on the backbone's hidden width), on every rank."""
    from adm_megatron.heads import MultiHeadDiscriminator

    with torch.device("meta"):
        heads = MultiHeadDiscriminator(
            num_heads=num_heads, in_channels=arch.hidden_size, kind="3d",
            hidden_channels=hidden, num_blocks=blocks,
        )
    return _size(heads, 1)
