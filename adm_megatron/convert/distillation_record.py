"""``distillation.json``: what an exported generator was distilled for, written beside its weights.

A diffusers transformer directory says what the network is, not how to sample it: a generator
distilled for 4 steps sampled with 8 (or at another size) gives wrong-looking samples without any
error. The trainer writes this record into the exported ``generator/`` (and ``generator_lora/``) so
that ``adm-megatron sample`` takes the step count and the size from it, and a reader of the directory sees the
method, teacher, latent size and iteration it came from. diffusers ignores the file.
"""

from __future__ import annotations

import json
import os

DISTILLATION_FILE = "distillation.json"


def distillation_record(config, iteration: int, ema: bool | None = None) -> dict:
    """The record of a run (``adm_megatron.config.Config``) exported after ``iteration`` iterations,
    its EMA weights (``ema`` None: when the run keeps an EMA, as the trainer exports) or raw ones."""
    d, m = config.data, config.model
    ema = config.train.ema_decay > 0 if ema is None else ema
    return {  # paths absolute: the record is read from other working directories
        "method": config.distill.method,
        "generator_steps": config.distill.generator_steps,
        "latent_size": {"frames": d.frames, "height": d.height, "width": d.width},
        "teacher": os.path.abspath(m.teacher),
        "pipeline": os.path.abspath(m.pipeline) if m.pipeline else None,
        "generator_init": os.path.abspath(m.generator_init) if m.generator_init else None,
        "teacher_guidance_scale": list(config.distill.guidance_scale),  # DMD2 / ADP: their pairs' (checked)
        "text_length": _text_length(config),
        "iteration": iteration,
        "weights": "ema" if ema else "raw",
        "ema_decay": config.train.ema_decay,
        "output_dir": os.path.abspath(config.output_dir),
    }


def _text_length(config) -> int | None:
    """The token length of the prompt embeddings the run trained on (``data.path``'s, as
    ``tools/precompute_text_embeddings.py --max-length`` wrote them), which ``sample`` encodes its
    prompts to; None for synthetic prompts or embeddings no longer there (the pipeline's default)."""
    from adm_megatron.data.text_embeddings import TextEmbeddingShards

    if config.data.source != "shards" or not config.data.path:
        return None
    try:
        return TextEmbeddingShards(config.data.path).seq_len
    except (OSError, ValueError):
        return None


def write_distillation_record(directory: str, record: dict) -> None:
    with open(os.path.join(directory, DISTILLATION_FILE), "w") as f:
        json.dump(record, f, indent=2)


def read_distillation_record(directory: str) -> dict | None:
    """The record in ``directory``, None when it has none (e.g. a converted checkpoint); a one-line
    ValueError when it is not a record."""
    path = os.path.join(directory, DISTILLATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    steps = record.get("generator_steps") if isinstance(record, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{path}: generator_steps={steps!r}: expected an integer >= 1")
    return record
