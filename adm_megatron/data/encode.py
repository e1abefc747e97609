"""T5 prompt encoding exactly as ``CogVideoXPipeline._get_t5_prompt_embeds`` does it.

The pipeline pads / truncates every prompt to ``max_sequence_length`` tokens (226 for CogVideoX)
with the tokenizer's special tokens, runs the encoder without an attention mask and takes its
last hidden state. :func:`encode_prompts` reproduces that in batches; :func:`load_t5` finds the
encoder and tokenizer in a pipeline root (``text_encoder/`` + ``tokenizer/``) or in one folder;
:func:`text_encoder_fingerprint` tells the encoders of two precomputes apart.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from adm_megatron.dtype_keyword import dtype_keyword
from adm_megatron.file_fingerprint import directory_fingerprint
from adm_megatron.hub_cache import not_found_hint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


@torch.no_grad()
def encode_prompts(
    text_encoder, tokenizer, prompts: Sequence[str], max_length: int = 226, batch_size: int = 8
) -> torch.Tensor:
    """``[len(prompts), max_length, d_model]`` on the CPU, in the encoder's dtype."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("encode_prompts: no prompts to encode")
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        out.append(text_encoder(ids.to(device))[0].to(text_encoder.dtype).cpu())
    return torch.cat(out)


def count_cut(tokenizer, prompts: Sequence[str], max_length: int) -> int:
    """How many of ``prompts`` are longer than ``max_length`` tokens (special tokens included), which
    encoding cuts, as the pipelines do."""
    return sum(len(ids) > max_length for ids in tokenizer(list(prompts), add_special_tokens=True).input_ids)


def text_encoder_fingerprint(directory: str) -> str:
    """The cheap fingerprint (``adm_megatron/file_fingerprint.py``) of what decides an encoding: the
    files of a pipeline root's ``text_encoder*/`` and ``tokenizer*/`` (T5, and SD3's two CLIPs), or
    of an encoder folder."""
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        return directory_fingerprint(directory)
    return directory_fingerprint(directory, [os.path.join(directory, d) for d in sorted(os.listdir(directory))
                                             if d.startswith(("text_encoder", "tokenizer"))
                                             and os.path.isdir(os.path.join(directory, d))])


def _resolve(directory: str) -> tuple[str, str]:
    """``(encoder_dir, tokenizer_dir)`` of a pipeline root or a combined encoder folder."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: encoder directory not found{not_found_hint(directory)}")
    encoder, tokenizer = os.path.join(directory, "text_encoder"), os.path.join(directory, "tokenizer")
    if os.path.isdir(encoder) and os.path.isdir(tokenizer):
        return encoder, tokenizer
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"{directory}: neither a pipeline root (text_encoder/ + tokenizer/) "
            "nor an encoder folder (config.json)")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return directory, directory


def load_t5(directory: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(text_encoder, tokenizer)`` from local files only, the encoder in eval mode."""
    from transformers import AutoTokenizer, T5EncoderModel

    encoder_dir, tokenizer_dir = _resolve(directory)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    text_encoder = T5EncoderModel.from_pretrained(encoder_dir, **dtype_keyword("transformers", dtype),
                                                  local_files_only=True)
    return text_encoder.to(device).eval(), tokenizer
