"""Where the teacher comes from, and what it implies for the run.

``model.teacher`` may be a diffusers transformer directory, a whole diffusers pipeline directory
(its ``transformer/`` is the teacher, its ``scheduler/`` the noise schedule, its VAE and text
encoder render the samples) or a megatron checkpoint written by ``tools/convert_checkpoint.py``.
The model family comes from the registry (``adm_megatron.families``), by the transformer's
``config.json`` ``_class_name`` or the checkpoint's recorded family; the architecture (latent
channels, text width and length, blocks) is read from the teacher's own config, so one run config
serves any teacher of a family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from adm_megatron.config import ConfigError
from adm_megatron.diffusion.schedules import NoiseSchedule, schedule_from_diffusers_config
from adm_megatron.families import ModelFamily, family_for_diffusers_class, known_diffusers_classes, read_model_config
from adm_megatron.file_fingerprint import file_fingerprint
from adm_megatron.hub_cache import not_found_hint
from adm_megatron.json_file import read_json_object
from adm_megatron.models.diffusers_files import transformer_fingerprint
from adm_megatron.models.weights import load_full_state_dict


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class TeacherSource:
    kind: str  # 'diffusers' | 'megatron'
    path: str  # the transformer directory or the megatron checkpoint
    pipeline_dir: str  # '' when there is no pipeline (no samples can be rendered)
    arch: object  # the family's architecture
    family: ModelFamily

    def schedule(self, key: str = "model.teacher") -> NoiseSchedule:
        """The noise schedule of the teacher's pipeline (``scheduler/scheduler_config.json``)."""
        pipelines = " or ".join(self.family.pipeline_classes)
        if not self.pipeline_dir:
            raise ConfigError(f"{key}={self.path}: a {'megatron checkpoint' if self.kind == 'megatron' else 'transformer directory'} "
                              f"has no noise schedule; set model.pipeline to its {pipelines} directory "
                              "(its scheduler/scheduler_config.json)")
        path = os.path.join(self.pipeline_dir, "scheduler", "scheduler_config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: no scheduler config found (expected {path}; set model.pipeline to a "
                              f"{pipelines} directory)")
        config = _read_json(path)
        name = config.get("_class_name")
        if name not in self.family.schedulers:
            raise ConfigError(f"{path}: scheduler {name!r} is not one the {self.family.name} family samples "
                              f"with (expected {', '.join(self.family.schedulers)})")
        try:
            return schedule_from_diffusers_config(config)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None

    def text_source(self, data, seed: int):
        """The prompt set of a run's ``data`` config (shards on disk, or synthetic from ``seed``) at the
        text shape this teacher takes (``adm_megatron.data.open_text_source``)."""
        from adm_megatron.data import open_text_source

        text = self.family.conditioning(self.arch)
        return open_text_source(data.source, data.path, data.num_prompts, text.text_length, text.text_width, seed,
                                pooled_dim=text.pooled_width or 0)

    def weights_fingerprint(self) -> str:
        """A cheap fingerprint of the teacher's weight files (``adm_megatron/file_fingerprint.py``):
        a diffusers directory's safetensors, a megatron checkpoint's ``*.distcp`` shards."""
        if self.kind != "megatron":
            return transformer_fingerprint(self.path)
        return file_fingerprint(self.path, sorted(os.path.join(self.path, n) for n in os.listdir(self.path)
                                                  if n.endswith(".distcp")))

    def build_models(self, count: int, **kwargs) -> list:
        """``count`` megatron copies of the teacher for the current parallel layout (``kwargs`` as
        the family's ``build_model``); diffusers weights are read from disk once."""
        if self.kind == "megatron":
            from adm_megatron.convert.checkpoint import load_megatron_checkpoint

            return [load_megatron_checkpoint(self.path, **kwargs) for _ in range(count)]
        weights = self.family.load_hf_weights(self.path, self.arch)
        models = []
        for _ in range(count):
            model = self.family.build_model(self.arch, **kwargs)
            load_full_state_dict(model, weights, source=self.path)
            models.append(model)
        return models


def _transformer_family(path: str) -> ModelFamily | None:
    """The family of a diffusers transformer directory; None when there is no config.json; a
    one-line ValueError naming the config.json when it is not a JSON object or its class no family reads."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    return family_for_diffusers_class(read_model_config(path).get("_class_name"), config)


def _is_pipeline_dir(path: str) -> bool:
    """Whether ``path`` holds a ``model_index.json``; a one-line ValueError naming it when that is not a
    JSON object (diffusers could not load the pipeline)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return False
    read_json_object(index)
    return True


def resolve_teacher(teacher: str, pipeline: str = "") -> TeacherSource:
    """One-line ConfigError when the path is none of the three kinds or its class is unknown."""
    from adm_megatron.convert.checkpoint import is_megatron_checkpoint, read_checkpoint_family, read_checkpoint_meta

    if not os.path.isdir(teacher):
        raise ConfigError(f"model.teacher={teacher!r}: directory not found{not_found_hint(teacher)}")
    try:
        pipeline_found = not pipeline or _is_pipeline_dir(pipeline)
    except ValueError as err:
        raise ConfigError(f"model.pipeline={pipeline!r}: {err}") from None
    if not pipeline_found:
        raise ConfigError(f"model.pipeline={pipeline!r}: not a diffusers pipeline directory (no model_index.json)"
                          f"{not_found_hint(pipeline)}")
    try:
        if _is_pipeline_dir(teacher):
            transformer = os.path.join(teacher, "transformer")
            family = _transformer_family(transformer)
            if family is None:
                raise ValueError(f"pipeline has no diffusers transformer in transformer/ "
                                 f"(known: {', '.join(known_diffusers_classes())})")
            return TeacherSource("diffusers", transformer, pipeline or teacher,
                                 family.arch_from_pretrained_dir(transformer), family)
        family = _transformer_family(teacher)
        if family is not None:
            return TeacherSource("diffusers", teacher, pipeline, family.arch_from_pretrained_dir(teacher), family)
        if is_megatron_checkpoint(teacher):
            if read_checkpoint_meta(teacher).get("lora"):  # built with them, its adapters would train in every copy
                raise ValueError("a LoRA generator's checkpoint: merge its adapters first (tools/convert_checkpoint.py "
                                 f"megatron-to-hf --ckpt {teacher} --out DIR) and give DIR")
            family, arch = read_checkpoint_family(teacher)
            return TeacherSource("megatron", teacher, pipeline, arch, family)
    except ValueError as err:
        raise ConfigError(f"model.teacher={teacher!r}: {err}") from None
    raise ConfigError(
        f"model.teacher={teacher!r}: expected a diffusers transformer ({', '.join(known_diffusers_classes())}) "
        "or pipeline directory, or a megatron checkpoint from tools/convert_checkpoint.py"
    )
