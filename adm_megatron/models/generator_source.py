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


def load_lora(pipeline, lora_dir: str) -> None:
    """The LoRA file's adapters through the pipeline's own ``load_lora_weights`` (its alpha / r scale
    from the file's metadata), left beside the transformer's weights as PEFT layers: each adapted
    linear computes W x + (alpha / r) B A x, as the trained generator did. Not fused: fusing adds
    B A into the weights in their dtype, and bf16 weights round most of a small trained delta away
    (see the README's LoRA section); the unfused adapters cost two rank-r products per layer."""
    pipeline.load_lora_weights(lora_dir)
