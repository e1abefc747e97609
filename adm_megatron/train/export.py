"""What a finished run hands over: the generator as a diffusers directory of its family's
transformer class (a LoRA generator: merged, and / or as a LoRA file). Its samples:
``adm_megatron.train.samples``."""

from __future__ import annotations

import torch

from adm_megatron.convert.checkpoint import export_diffusers
from adm_megatron.lora import lora_adapters
from adm_megatron.lora.export import export_lora_generator


def export_generator(generator: torch.nn.Module, arch, out_dir: str, lora_mode: str = "merged",
                     record: dict | None = None) -> str | None:
    """Collective: the generator's weights (gathered over TP) as a diffusers directory, with
    ``record`` (``adm_megatron.convert.distillation_record``) as its ``distillation.json``. A LoRA
    generator is exported as ``lora_mode`` says (``adm_megatron.lora.export.export_lora_generator``);
    returns the diffusers directory, None if only the LoRA file was asked for."""
    if lora_adapters(generator) is not None:
        return export_lora_generator(generator, arch, out_dir, lora_mode, record=record)
    return export_diffusers(generator, arch, out_dir, overwrite=True, record=record)
