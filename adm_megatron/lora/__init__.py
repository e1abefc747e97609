"""LoRA generators: adapters on the tensor-parallel linears of a megatron model (only they train),
their target resolution in diffusers module names, and merging them into whole weights. Exporting
(merged, or as a diffusers LoRA file) is ``adm_megatron.lora.export``, which writes through the
checkpoint converter (``adm_megatron.convert``); the converter in turn loads LoRA checkpoints with
what this package gives, so the package itself does not import ``export``."""

from adm_megatron.lora.adapters import LoraAdapter, LoraAdapters, apply_lora, lora_adapters
from adm_megatron.lora.merge import merged_full_state_dict
from adm_megatron.lora.targets import LoraTarget, check_targets, resolve_targets

__all__ = [
    "LoraAdapter",
    "LoraAdapters",
    "LoraTarget",
    "apply_lora",
    "check_targets",
    "lora_adapters",
    "merged_full_state_dict",
    "resolve_targets",
]
