"""What a generator directory handed to sampling holds: a whole diffusers transformer (a run's
``generator/``, a converted checkpoint) or a diffusers LoRA file (a run's ``generator_lora/``:
``pytorch_lora_weights.safetensors``, adapters for the pipeline's own transformer, the teacher)."""

from __future__ import annotations

import os

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def generator_parts(pipeline_dir: str, generator_dir: str | None) -> tuple[str, str | None]:
    """(the transformer directory, the LoRA directory or None) that make up ``generator_dir``
    (``None``: the pipeline's own transformer)."""
    teacher = os.path.join(pipeline_dir, "transformer")
    if generator_dir is None:
        return teacher, None
    if os.path.isfile(os.path.join(generator_dir, LORA_WEIGHTS)) and not os.path.isfile(
            os.path.join(generator_dir, "config.json")):
        return teacher, generator_dir
    return generator_dir, None


def fuse_lora(pipeline, lora_dir: str) -> None:
    """The LoRA file's adapters through the pipeline's own ``load_lora_weights`` (its alpha / r scale
    from the file's metadata), fused into the transformer's weights and unloaded, so sampling runs
    the plain fused model at the speed of a merged one."""
    pipeline.load_lora_weights(lora_dir)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
