"""What a generator directory handed to sampling holds: a whole diffusers transformer (a run's
``generator/``, a converted checkpoint) or a diffusers LoRA file (a run's ``generator_lora/``:
``pytorch_lora_weights.safetensors``, adapters for the transformer the run trained them on: the
teacher -- the pipeline's own transformer or a transformer directory given as ``model.teacher`` --
or the run's ``model.generator_init``, which its ``distillation.json`` records), the teacher it was
distilled from, and the cheap checks that the adapters fit that transformer."""

from __future__ import annotations

import json
import os

from adm_megatron.convert.distillation_record import DISTILLATION_FILE, read_distillation_record
from adm_megatron.data.safetensors_rows import check_safetensors_file
from adm_megatron.models.diffusers_files import diffusers_weight_shapes, transformer_fingerprint

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def generator_parts(pipeline_dir: str, generator_dir: str | None) -> tuple[str, str | None]:
    """(the transformer directory, the LoRA directory or None) that make up ``generator_dir``
    (``None``: the pipeline's own transformer)."""
    if generator_dir is None:
        return os.path.join(pipeline_dir, "transformer"), None
    if os.path.isfile(os.path.join(generator_dir, LORA_WEIGHTS)) and not os.path.isfile(
            os.path.join(generator_dir, "config.json")):
        return lora_base(generator_dir, pipeline_dir), generator_dir
    return generator_dir, None


def teacher_transformer(pipeline_dir: str, record: dict | None) -> str:
    """The diffusers transformer directory of the teacher a generator was distilled from: the run's
    ``model.teacher`` when its ``distillation.json`` (``record``) names a transformer directory (e.g.
    a fine-tuned teacher beside ``model.pipeline``), else the pipeline's own ``transformer/`` (a
    pipeline teacher, a moved copy of it, or a megatron checkpoint's). One-line ValueError when the
    recorded teacher, not the pipeline, is gone."""
    record = record or {}
    teacher, recorded_pipeline = record.get("teacher"), record.get("pipeline")
    if teacher and recorded_pipeline and os.path.normpath(teacher) == os.path.join(
            os.path.normpath(recorded_pipeline), "transformer"):  # the pipeline's own, named as a transformer
        return os.path.join(pipeline_dir, "transformer")
    if teacher and os.path.isfile(os.path.join(teacher, "config.json")):
        return teacher
    if teacher and recorded_pipeline and not os.path.isdir(teacher):
        raise ValueError(f"the teacher {teacher} it was distilled from ({DISTILLATION_FILE}, beside model.pipeline="
                         f"{recorded_pipeline}) is not there")
    return os.path.join(pipeline_dir, "transformer")


def lora_base(lora_dir: str, pipeline_dir: str) -> str:
    """The transformer ``lora_dir``'s adapters were trained on: the run's ``model.generator_init``
    when its ``distillation.json`` records one (a LoRA stage after ADP: the adapters on the teacher
    would sample the teacher plus a delta), else the teacher it records (:func:`teacher_transformer`
    of the pipeline whose ``transformer/`` is ``teacher``); one-line ValueError when it is gone."""
    record = read_distillation_record(lora_dir) or {}
    init = record.get("generator_init")
    recorded = record.get("weights_fingerprints") or {}  # none in records from before them
    if not init:
        try:
            base = teacher_transformer(pipeline_dir, record)
        except ValueError as err:
            raise ValueError(f"--generator {lora_dir}: {err}") from None
        if recorded.get("teacher_kind") == "diffusers":  # a megatron teacher's are of its shards
            trained_on = record.get("teacher") or ""
            _check_unchanged(lora_dir, base, "the teacher", recorded["teacher"],
                             trained_on if _elsewhere(base, trained_on) else None)
        return base
    if not os.path.isdir(init):
        raise ValueError(f"--generator {lora_dir}: its adapters were trained on model.generator_init={init} "
                         "(distillation.json), which is not there; sample the run's merged generator/ instead")
    if recorded.get("generator_init"):
        _check_unchanged(lora_dir, init, f"model.generator_init={init}", recorded["generator_init"])
    return init


def _elsewhere(base: str, trained_on: str) -> bool:
    """Whether the transformer ``base`` is not where the run's teacher ``trained_on`` (a transformer or
    pipeline directory, as distillation.json records it) was: another pipeline given to sample with."""
    if not trained_on:
        return False
    here = os.path.realpath(base)
    return here not in {os.path.realpath(trained_on), os.path.realpath(os.path.join(trained_on, "transformer"))}


def _check_unchanged(lora_dir: str, base: str, what: str, fingerprint: str, trained_on: str | None = None) -> None:
    """One-line ValueError when the weight files of ``base`` do not have the ``fingerprint`` the run
    recorded of them: the adapters would be sampled on another transformer (``trained_on``: where the
    run's was, when ``base`` lies elsewhere; else its files changed since)."""
    now = transformer_fingerprint(base)
    if now == fingerprint:
        return
    trained = f"--generator {lora_dir}: its adapters were trained on {what} of fingerprint {fingerprint[:12]} (distillation.json)"
    if trained_on:
        raise ValueError(f"{trained}, not on {base} ({now[:12]}), which is not where it was ({trained_on}): sample with "
                         "that pipeline, or the run's merged generator/")
    raise ValueError(f"{trained}, {base} now has {now[:12]} (its weight files changed since); sample the run's merged "
                     "generator/ instead")


def check_lora_fits(lora_dir: str, base: str) -> None:
    """One-line ValueError unless every adapter of ``lora_dir`` sits on a linear of ``base`` of its
    shape (lora_A [r, in], lora_B [out, r] on a weight [out, in]): diffusers only warns about
    adapters it cannot place and samples the base model. Reads the safetensors headers only."""
    weights = diffusers_weight_shapes(base)
    adapters = check_safetensors_file(os.path.join(lora_dir, LORA_WEIGHTS))[0]
    for key, shape in sorted((k, tuple(t["shape"])) for k, t in adapters.items()):
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        target = weights.get(f"{module}.weight")
        fits = target is not None and len(shape) == len(target) == 2 and (
            shape[1] == target[1] if part.startswith("A") else shape[0] == target[0])
        if not fits:
            found = "no such layer" if target is None else f"a weight of shape {list(target)}"
            raise ValueError(f"--generator {lora_dir}: adapter {key} {list(shape)} does not fit {base} ({found}): "
                             "LoRA adapters of another model")


def not_a_generator_hint(path: str) -> str | None:
    """What to use instead when ``path`` is a run's directory, a training checkpoint (or one of its
    networks), a megatron checkpoint, a whole pipeline or a LoRA directory where a whole diffusers
    transformer is expected; None for anything else."""
    if os.path.isfile(os.path.join(path, "generator", "config.json")):
        return f"a run directory: its exported generator is {os.path.join(path, 'generator')}"
    if os.path.isfile(os.path.join(path, "trainer_state.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
        return (f"a training run or checkpoint without an exported generator: adm-megatron export --checkpoint "
                f"{path} --out DIR writes it")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return f"a whole diffusers pipeline: give its transformer, {os.path.join(path, 'transformer')}"
    megatron = _megatron_checkpoint_hint(path)
    if megatron:
        return megatron
    if os.path.isfile(os.path.join(path, LORA_WEIGHTS)):
        return ("a LoRA file without its base weights: use the run's merged generator/ (train.export_lora merged "
                "or both, or adm-megatron export --lora merged)")
    return None


def _megatron_checkpoint_hint(path: str) -> str | None:
    """The command that writes the megatron checkpoint ``path`` as a diffusers directory: a training
    checkpoint's network (``iter_N/generator``) is exported from its checkpoint (the EMA, as the run
    would), any other is converted; None when ``path`` is not a megatron checkpoint."""
    from adm_megatron.convert.checkpoint import CHECKPOINT_META_FILE

    meta = os.path.join(path, CHECKPOINT_META_FILE)
    if not os.path.isfile(meta):
        return None
    training = os.path.normpath(os.path.join(path, os.pardir))  # as the user wrote it, relative or not
    if os.path.isfile(os.path.join(training, "trainer_state.json")):
        return (f"a megatron network of the training checkpoint {training}: adm-megatron export "
                f"--checkpoint {training} --out DIR writes its generator as a diffusers directory")
    try:
        with open(meta) as f:
            model = json.load(f).get("model") or "FAMILY"
    except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object
        model = "FAMILY"
    return (f"a megatron checkpoint: python tools/convert_checkpoint.py megatron-to-hf --model {model} --ckpt {path} "
            "--out DIR writes it as a diffusers directory")


def load_lora(pipeline, lora_dir: str) -> None:
    """The LoRA file's adapters through the pipeline's own ``load_lora_weights`` (its alpha / r scale
    from the file's metadata), left beside the transformer's weights as PEFT layers: each adapted
    linear computes W x + (alpha / r) B A x, as the trained generator did. Not fused: fusing adds
    B A into the weights in their dtype, and bf16 weights round most of a small trained delta away
    (see the README's LoRA section); the unfused adapters cost two rank-r products per layer."""
    pipeline.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS)  # named: diffusers 0.35 offline needs it
