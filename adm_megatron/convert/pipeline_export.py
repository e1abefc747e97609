"""A distilled generator as a whole diffusers pipeline directory, to hand over or publish it
(``adm-megatron export --pipeline-out``): the teacher pipeline's other components copied (copies, not
links: a later ``save_pretrained`` over a linked file would write into the teacher's), the generator as
``transformer/`` (with its ``distillation.json``), the scheduler set to the class the generator samples
with (CogVideoX-5b's pipeline ships the stochastic DPM one; the config is the teacher's), and a
README.md whose call is ``DiffusionPipeline.from_pretrained`` of the directory with the few-step
arguments. Nothing of the teacher pipeline is changed.
"""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from adm_megatron.convert.checkpoint import CheckpointError, check_output_dir, write_atomically
from adm_megatron.convert.model_card import MODEL_CARD, write_pipeline_card

SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


def pipeline_source(teacher: str, pipeline: str) -> str:
    """The pipeline directory a run's generator goes into (``model.pipeline``, else a pipeline
    ``model.teacher``); one-line CheckpointError when the run has none at hand."""
    source = pipeline or teacher
    index = os.path.join(source, "model_index.json")
    if not os.path.isfile(index):
        raise CheckpointError(f"--pipeline-out: the run's pipeline {source} is not a diffusers pipeline directory "
                              "(no model_index.json) here; give the generator to the pipeline by hand")
    with open(index) as f:
        components = json.load(f)
    # a required component saved as None (a transformer-only teacher, as the toy's): from_pretrained refuses
    # the copy; the pipeline class's optional ones (SD3's image encoder) load as None
    optional = _optional_components(components.get("_class_name"))
    missing = sorted(name for name, value in components.items()
                     if isinstance(value, list) and value[0] is None and name not in optional)
    if missing:
        raise CheckpointError(f"--pipeline-out: the run's pipeline {source} has no {', '.join(missing)} "
                              "(model_index.json lists them as null), so its copy would not load; give the generator "
                              "to a whole pipeline by hand")
    return source


def _optional_components(pipeline_class: str | None) -> tuple[str, ...]:
    """The components diffusers' ``pipeline_class`` loads as None when its model_index.json lists them
    as null (none for a class diffusers does not have)."""
    import diffusers

    return tuple(getattr(getattr(diffusers, pipeline_class or "", None), "_optional_components", ()))


def check_pipeline_output(out_dir: str, overwrite: bool, sources: list[str]) -> None:
    """One-line CheckpointError when ``out_dir`` may not be written, or is or holds one of ``sources``."""
    for source in sources:
        check_output_dir(os.path.abspath(out_dir), overwrite, source=source)


def _write_json(path: str, values: dict) -> None:
    """A new file at ``path`` (the copy is replaced, never written into)."""
    os.remove(path)
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
        f.write("\n")


def write_pipeline(generator_dir: str, record: dict, pipeline: str, out_dir: str, overwrite: bool = False) -> str:
    """Collective: ``pipeline``'s components with the generator at ``generator_dir`` as its
    transformer, written atomically to ``out_dir`` by rank 0 (see the module docstring)."""
    scheduler = record["sampling"]["scheduler"]

    def write(tmp: str) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        for name in os.listdir(pipeline):
            source, target = os.path.join(pipeline, name), os.path.join(tmp, name)
            if name in ("transformer", MODEL_CARD) or name.startswith("."):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        shutil.copytree(generator_dir, os.path.join(tmp, "transformer"), ignore=shutil.ignore_patterns(MODEL_CARD))
        if scheduler:
            with open(os.path.join(tmp, SCHEDULER_CONFIG)) as f:
                _write_json(os.path.join(tmp, SCHEDULER_CONFIG), {**json.load(f), "_class_name": scheduler})
            with open(os.path.join(tmp, "model_index.json")) as f:
                index = json.load(f)
            _write_json(os.path.join(tmp, "model_index.json"), {**index, "scheduler": ["diffusers", scheduler]})
        write_pipeline_card(tmp, record, pipeline)

    return write_atomically(out_dir, overwrite, write)
