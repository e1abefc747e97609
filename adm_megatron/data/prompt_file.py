"""Prompt files: one prompt per line (stripped; blank lines skipped), as
``tools/precompute_text_embeddings.py --prompts`` and ``adm-megatron sample --prompt-file`` read them."""

from __future__ import annotations

import os


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``path``; a one-line ValueError naming it when it is missing or has none."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: prompt file not found")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank; expected one per line)")
    return prompts
