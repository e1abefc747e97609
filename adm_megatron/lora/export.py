"""Exporting a LoRA generator: merged into a whole diffusers transformer, or as a diffusers / PEFT
LoRA file (``pytorch_lora_weights.safetensors``) for ``Pipeline.load_lora_weights``.

- merged: the whole base weights (gathered over TP) with ``W + (alpha / r) B A`` for each adapted
  layer, written by the converter's own diffusers export.
- adapter: PEFT keys ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight``. Each
  adapter's B is mapped to diffusers names by the model's own key mapping as if it were the
  layer's weight (B has the weight's rows, so a fused layer's B splits the way its weight does:
  CogVideoX's ``linear_qkv`` into ``to_q`` / ``to_k`` / ``to_v``), and every part keeps the whole
  A. The file is written by the pipeline class's own ``save_lora_weights`` with the adapter
  metadata (``r``, ``lora_alpha``, ``target_modules``) that diffusers turns back into the PEFT
  ``LoraConfig``, so the alpha / r scale survives loading.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from adm_megatron.convert.checkpoint import export_full_state_dict, write_atomically
from adm_megatron.convert.distillation_record import write_distillation_record
from adm_megatron.lora.merge import full_adapters, merged_full_state_dict, require_adapters
from adm_megatron.lora.targets import KeyMapping, default_key_mapping
from adm_megatron.models.generator_source import LORA_WEIGHTS

LORA_EXPORTS = ("merged", "adapter", "both")


def peft_state_dict(model: torch.nn.Module, to_hf: KeyMapping | None = None) -> tuple[dict, dict]:
    """Collective over TP: (diffusers-named LoRA tensors without the ``transformer.`` prefix, the
    adapter metadata for diffusers' ``LoraConfig``)."""
    adapters = require_adapters(model)
    to_hf = to_hf or default_key_mapping(model)
    state = {}
    for key, (a, b) in full_adapters(adapters).items():
        path = adapters.targets[key].path
        for name, b_part in to_hf({f"{path}.weight": b}).items():
            module = name[: -len(".weight")]
            state[f"{module}.lora_A.weight"] = a.clone()
            state[f"{module}.lora_B.weight"] = b_part.contiguous()
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    metadata = {"r": adapters.config.rank, "lora_alpha": adapters.config.alpha, "target_modules": modules}
    return state, metadata


def _default_pipeline_class(model: torch.nn.Module):
    """The diffusers pipeline of ``model``'s family, whose ``save_lora_weights`` writes the file
    (and whose ``load_lora_weights`` reads it)."""
    import diffusers

    from adm_megatron.families import family_of_arch

    return getattr(diffusers, family_of_arch(model.arch).pipeline_classes[0])


def export_lora_file(model: torch.nn.Module, out_dir: str, *, overwrite: bool = False, pipeline_class=None,
                     to_hf: KeyMapping | None = None, record: dict | None = None) -> str:
    """Collective: ``out_dir/pytorch_lora_weights.safetensors`` (rank 0 writes it atomically, with
    ``record`` as ``distillation.json`` when given)."""
    state, metadata = peft_state_dict(model, to_hf)
    pipeline_class = pipeline_class or _default_pipeline_class(model)

    def write(tmp: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            pipeline_class.save_lora_weights(tmp, transformer_lora_layers=state, weight_name=LORA_WEIGHTS,
                                             transformer_lora_adapter_metadata=metadata)
            if record is not None:
                write_distillation_record(tmp, record, lora=True)

    return write_atomically(out_dir, overwrite, write)


def export_merged(model: torch.nn.Module, arch, out_dir: str, *, overwrite: bool = False,
                  record: dict | None = None) -> str:
    """Collective: the merged generator as a diffusers transformer directory."""
    return export_full_state_dict(merged_full_state_dict(model), arch, out_dir, overwrite=overwrite, record=record)


def lora_export_dirs(out_dir: str, mode: str) -> dict[str, str]:
    """The directories a LoRA generator's export ``mode`` writes: ``merged`` -> ``out_dir``,
    ``adapter`` -> ``out_dir`` + ``_lora`` (a run's ``generator/`` and ``generator_lora/``), ``both``
    -> both."""
    if mode not in LORA_EXPORTS:
        raise ValueError(f"train.export_lora={mode!r}: expected one of {', '.join(LORA_EXPORTS)}")
    dirs = {"merged": out_dir, "adapter": os.path.normpath(out_dir) + "_lora"}
    return {kind: path for kind, path in dirs.items() if mode in (kind, "both")}


def export_lora_generator(model: torch.nn.Module, arch, out_dir: str, mode: str, record: dict | None = None) -> str | None:
    """Collective: the directories of :func:`lora_export_dirs` (existing ones replaced; ``record`` in
    each). Returns the merged directory, or None when it was not asked for."""
    dirs = lora_export_dirs(out_dir, mode)
    if "merged" in dirs:
        export_merged(model, arch, dirs["merged"], overwrite=True, record=record)
    if "adapter" in dirs:
        export_lora_file(model, dirs["adapter"], overwrite=True, record=record)
    return dirs.get("merged")
