"""Prompt files: one prompt per line (stripped; blank lines skipped; every other line is a prompt,
``#`` lines and repeats included), UTF-8 with or without a byte-order mark, any line ending, as
``tools/precompute_text_embeddings.py --prompts`` and ``adm-megatron sample --prompt-file`` read them."""

from __future__ import annotations

import os


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``path``; a one-line ValueError naming it when it is missing, not UTF-8 or has
    none. A leading byte-order mark (Windows editors write one) is not part of the first prompt."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a prompt file")
    if not os.path.exists(path):
        raise ValueError(f"{path}: prompt file not found")
    try:  # any readable file: a pipe, /dev/stdin, a shell's <(...) too
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the prompt file ({err.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1  # err.object: the bytes after a byte-order mark
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} on line {line}: {err.reason}); "
                         "save it as UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as open()'s universal newlines
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank; expected one per line)")
    return prompts
