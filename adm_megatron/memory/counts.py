"""Exact per-rank sizes of the networks of an ADM run, from models built on the ``meta`` device.

The backbone is built once on ``meta`` -- no memory, no weights -- for the layout in force
(a world of one when none is set up), and each parameter is counted whole or as ``1 / TP`` of its
full size, as megatron-core's ``tensor_model_parallel`` tag on it says (column / row parallel weights and biases are split, norms,
adaLN, embeddings and the output projection are replicated). The discriminator heads are plain
torch modules, replicated on every rank. Buffers (the 2b's sin-cos position table) are counted too.
A LoRA generator (``model.lora``) is the backbone plus its adapters, of which only the adapters
train: they alone have grads and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class NetworkSize:
    params: int  # parameter elements held by one rank
    largest_param: int  # elements of the largest parameter tensor on one rank
    buffer_bytes: int  # bytes of the module's buffers on one rank (as built, fp32)
    trainable: int | None = None  # elements that train (grads, optimizer state); None: all of params

    @property
    def trained(self) -> int:
        return self.params if self.trainable is None else self.trainable


def _size(module: torch.nn.Module, tensor_parallel: int, built_tensor_parallel: int = 1) -> NetworkSize:
    """Sizes on one of ``tensor_parallel`` ranks, from a module built for ``built_tensor_parallel``."""
    per_rank = [
        p.numel() * built_tensor_parallel // tensor_parallel if getattr(p, "tensor_model_parallel", False)
        else p.numel()
        for p in module.parameters()
    ]
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return NetworkSize(params=sum(per_rank), largest_param=max(per_rank), buffer_bytes=buffers)


def backbone_size(arch, tensor_parallel: int) -> NetworkSize:
    """One backbone (teacher, fake score or generator) as one rank of ``tensor_parallel`` holds it."""
    from adm_megatron.families import family_of_arch

    # for the layout in force: a world of one if none
    model = family_of_arch(arch).build_model(arch, device="meta")
    return _size(model, tensor_parallel, model.config.tensor_model_parallel_size)


def lora_generator_size(arch, tensor_parallel: int, lora) -> NetworkSize:
    """A LoRA generator (``lora``: the run's ``LoraConfig``) on one of ``tensor_parallel`` ranks."""
    from adm_megatron.families import family_of_arch
    from adm_megatron.lora import apply_lora

    model = family_of_arch(arch).build_model(arch, device="meta")
    adapters = apply_lora(model, lora, seed=0)
    built = model.config.tensor_model_parallel_size
    return replace(_size(model, tensor_parallel, built),
                               trainable=_size(adapters, tensor_parallel, built).params)


def heads_size(arch, num_heads: int, hidden: int, blocks: int) -> NetworkSize:
    """The multi-head discriminator (the family's head kind on the backbone's hidden width), on
    every rank."""
    from adm_megatron.families import family_of_arch
    from adm_megatron.heads import MultiHeadDiscriminator

    with torch.device("meta"):
        heads = MultiHeadDiscriminator(
            num_heads=num_heads, in_channels=arch.hidden_size, kind=family_of_arch(arch).head_kind,
            hidden_channels=hidden, num_blocks=blocks,
        )
    return _size(heads, 1)
