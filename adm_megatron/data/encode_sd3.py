"""SD3 / SD3.5 prompt encoding: the pipeline's own ``StableDiffusion3Pipeline.encode_prompt``.

SD3 conditions on three encoders -- two CLIP text encoders (their penultimate hidden states,
concatenated and zero-padded to the T5 width, then the T5 tokens after them along the sequence)
and the two CLIP projections concatenated as the pooled embedding. Rather than re-implement that
recipe, the pipeline is loaded from local files without its transformer and VAE, and its
``encode_prompt`` gives ``(embeddings [n, 77 + L_t5, 4096], pooled [n, 2048])`` at real size.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from adm_megatron.dtype_keyword import dtype_keyword
from adm_megatron.models.pipeline_files import missing_components

PIPELINE_CLASS = "StableDiffusion3Pipeline"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def is_sd3_pipeline(directory: str) -> bool:
    """Whether ``directory`` is a diffusers ``StableDiffusion3Pipeline`` root."""
    index = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == PIPELINE_CLASS


def load_sd3_text_pipeline(directory: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The pipeline's tokenizers and text encoders only (no transformer, no VAE), local files only."""
    from diffusers import StableDiffusion3Pipeline

    if not is_sd3_pipeline(directory):
        raise FileNotFoundError(f"{directory}: not a {PIPELINE_CLASS} directory (model_index.json)")
    with open(os.path.join(directory, "model_index.json")) as f:
        index = json.load(f)
    missing = missing_components(directory, index, TEXT_PARTS)
    if missing:
        raise FileNotFoundError(f"{directory}: {', '.join(p + '/' for p in missing)} not found, which its "
                                "model_index.json lists")
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        directory, transformer=None, vae=None, **dtype_keyword("diffusers", dtype), local_files_only=True
    )
    return pipeline.to(device)


@torch.no_grad()
def encode_sd3_prompts(
    pipeline, prompts: Sequence[str], max_length: int = 256, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings [n, L, D], pooled [n, P])`` on the CPU, as the pipeline conditions on them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("encode_sd3_prompts: no prompts to encode")
    embeddings, pooled = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
            chunk, None, None, device=pipeline.device, do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        embeddings.append(embeds.cpu())
        pooled.append(pooled_embeds.cpu())
    return torch.cat(embeddings), torch.cat(pooled)
