"""LoRA generators: adapters on the tensor-parallel linears of a megatron model (only they train),
their target resolution in diffusers module names, and export merged or as a diffusers LoRA file."""

from adm_megatron.lora.adapters import LoraAdapter, LoraAdapters, apply_lora, lora_adapters
from adm_megatron.lora.export import (
    LORA_WEIGHTS,
    export_lora_file,
    export_lora_generator,
    export_merged,
    merged_full_state_dict,
    peft_state_dict,
)
from adm_megatron.lora.targets import LoraTarget, check_targets, resolve_targets

__all__ = [
    "LORA_WEIGHTS",
    "LoraAdapter",
    "LoraAdapters",
    "LoraTarget",
    "apply_lora",
    "check_targets",
    "export_lora_file",
    "export_lora_generator",
    "export_merged",
    "lora_adapters",
    "merged_full_state_dict",
    "peft_state_dict",
    "resolve_targets",
]
