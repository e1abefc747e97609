"""A LoRA model's adapters made whole: each adapter's (A, B) gathered over tensor parallelism, and
the model's whole state dict with every adapter merged into its layer's weight
(``W + (alpha / r) B A``) -- what the merged export and the checkpoint converter write."""

from __future__ import annotations

import torch

from adm_megatron.lora.adapters import LORA_MODULE, LoraAdapters, lora_adapters
from adm_megatron.models.weights import gather_full_state_dict, gather_tensor_parallel


def require_adapters(model) -> LoraAdapters:
    adapters = lora_adapters(model)
    if adapters is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to export")
    return adapters


def full_adapters(adapters: LoraAdapters) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Collective over TP: each adapter's whole (A, B) on every rank, on CPU."""
    out = {}
    for key, adapter in adapters.items():
        a, b = (gather_tensor_parallel(p.detach(), p).cpu().clone() for p in (adapter.lora_A, adapter.lora_B))
        out[key] = (a, b)
    return out


def merged_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective over TP: the model's whole megatron state dict with every adapter merged into its
    layer's weight, and no adapter keys (a plain model's state dict)."""
    adapters = require_adapters(model)
    full = {k: v for k, v in gather_full_state_dict(model).items() if not k.startswith(LORA_MODULE + ".")}
    for key, (a, b) in full_adapters(adapters).items():
        name = f"{adapters.targets[key].path}.weight"
        weight = full[name]  # W + scale B A summed in float64 and rounded once (to bf16: as closely as bf16 can)
        full[name] = (weight.double() + adapters[key].delta_weight(a, b)).to(weight.dtype)
    return full
