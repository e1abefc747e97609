"""``distillation.json``: what an exported generator was distilled for, written beside its weights.

A diffusers transformer directory says what the network is, not how to sample it: a generator
distilled for 4 steps sampled with 8 (or at another size) gives wrong-looking samples without any
error. The trainer writes this record into the exported ``generator/`` (and ``generator_lora/``) so
that ``adm-megatron sample`` takes the step count and the size from it, and a reader of the directory sees the
method, teacher, latent size and iteration it came from, and (``sampling``) the diffusers pipeline call
that samples it. diffusers ignores the file.
"""

from __future__ import annotations

import json
import os

DISTILLATION_FILE = "distillation.json"


def distillation_record(config, iteration: int, arch, ema: bool | None = None, weights: dict | None = None) -> dict:
    """The record of a run (``adm_megatron.config.Config``) of a generator of architecture ``arch``
    exported after ``iteration`` iterations, its EMA weights (``ema`` None: when the run keeps an EMA,
    as the trainer exports) or raw ones; ``weights``: the fingerprints of the teacher's and
    ``model.generator_init``'s weight files the run trained with (``train/input_identity.py``; None:
    not known, as for a checkpoint from before they were recorded)."""
    d, m = config.data, config.model
    ema = config.train.ema_decay > 0 if ema is None else ema
    text_length = _text_length(config)
    return {  # paths absolute: the record is read from other working directories
        "method": config.distill.method,
        "generator_steps": config.distill.generator_steps,
        "latent_size": {"frames": d.frames, "height": d.height, "width": d.width},
        "teacher": os.path.abspath(m.teacher),
        "pipeline": os.path.abspath(m.pipeline) if m.pipeline else None,
        "generator_init": os.path.abspath(m.generator_init) if m.generator_init else None,
        "weights_fingerprints": weights,  # of the teacher and generator_init: what LoRA adapters sit on
        "teacher_guidance_scale": list(config.distill.guidance_scale),  # DMD2 / ADP: their pairs' (checked)
        "text_length": text_length,
        "iteration": iteration,
        "weights": "ema" if ema else "raw",
        "ema_decay": config.train.ema_decay,
        "output_dir": os.path.abspath(config.output_dir),
        "sampling": sampling_call(config, arch, text_length),
    }


def sampling_call(config, arch, text_length: int | None) -> dict:
    """How the family's diffusers pipeline samples the generator as it was distilled (what
    ``adm-megatron sample`` does by default; the README.md beside the weights spells it out): the
    pipeline, transformer and scheduler classes (the scheduler built from the pipeline's own config), the call's
    ``num_inference_steps``, ``guidance_scale`` 1 (no CFG: the teacher's CFG is distilled in), and,
    read from the pipeline's configs when it is at hand, its pixel size and text arguments."""
    from adm_megatron.families import family_of_arch
    from adm_megatron.models.pipeline_size import pipeline_scale

    family, d, m = family_of_arch(arch), config.data, config.model
    call = {"pipeline_class": family.pipeline_classes[0], "transformer_class": family.diffusers_classes[0],
            "scheduler": family.sampler_scheduler,
            "num_inference_steps": config.distill.generator_steps, "guidance_scale": 1.0}
    pipeline = m.pipeline or (m.teacher if os.path.isfile(os.path.join(m.teacher, "model_index.json")) else "")
    try:  # a pipeline without a VAE (the toy teacher) or no longer there: its latent size only
        scale = pipeline_scale(pipeline, family.arch_to_diffusers_config(arch), family.latent_layout == "video")
        call.update(scale.pixels(d.frames, d.height, d.width))
        if family.prompt_call_options is not None:
            call.update(family.prompt_call_options(pipeline, arch, text_length))
    except (OSError, KeyError, ValueError):
        pass
    return call


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


def write_distillation_record(directory: str, record: dict, lora: bool = False) -> None:
    """``record`` as ``directory/distillation.json``, and for a whole record (:func:`distillation_record`'s,
    with ``sampling``) the README.md that says how to sample the generator with diffusers alone
    (``adm_megatron.convert.model_card``; ``lora``: a LoRA file's)."""
    from adm_megatron.convert.model_card import write_model_card

    with open(os.path.join(directory, DISTILLATION_FILE), "w") as f:
        json.dump(record, f, indent=2)
    if "sampling" in record:
        write_model_card(directory, record, lora=lora)


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
