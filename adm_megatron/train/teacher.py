"""Where the teacher comes from, and what it implies for the run.

``model.teacher`` may be a diffusers ``CogVideoXTransformer3DModel`` directory, a whole
``CogVideoXPipeline`` directory (its ``transformer/`` is the teacher, its ``scheduler/`` the noise
schedule, its VAE and text encoder render the samples) or a megatron checkpoint written by
``tools/convert_checkpoint.py``. The architecture (latent channels, text width and length, blocks)
is read from the teacher's own config, so one run config serves any CogVideoX teacher.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from adm_megatron.config import ConfigError
from adm_megatron.diffusion.schedules import NoiseSchedule, schedule_from_diffusers_config
from adm_megatron.models import CogVideoXArch, build_model
from adm_megatron.models.build import load_hf_weights
from adm_megatron.models.weights import load_full_state_dict

_TRANSFORMER = "CogVideoXTransformer3DModel"


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class TeacherSource:
    kind: str  # 'diffusers' | 'megatron'
    path: str  # the transformer directory or the megatron checkpoint
    pipeline_dir: str  # '' when there is no pipeline (no samples can be rendered)
    arch: CogVideoXArch

    def schedule(self, key: str = "model.teacher") -> NoiseSchedule:
        """The noise schedule of the teacher's pipeline (``scheduler/scheduler_config.json``)."""
        path = os.path.join(self.pipeline_dir, "scheduler", "scheduler_config.json")
        if not self.pipeline_dir or not os.path.isfile(path):
            raise ConfigError(
                f"{key}: no scheduler config found (expected {path or 'a pipeline directory'}; "
                "set model.pipeline to a CogVideoXPipeline directory)"
            )
        try:
            return schedule_from_diffusers_config(_read_json(path))
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None


    def build_models(self, count: int, **kwargs) -> list:
        """``count`` megatron CogVideoX copies of the teacher for the current parallel layout
        (``kwargs`` as ``models.build_model``); diffusers weights are read from disk once."""
        if self.kind == "megatron":
            from adm_megatron.convert.checkpoint import load_megatron_checkpoint

            return [load_megatron_checkpoint(self.path, **kwargs) for _ in range(count)]
        weights = load_hf_weights(self.path, self.arch)
        models = []
        for _ in range(count):
            model = build_model(self.arch, **kwargs)
            load_full_state_dict(model, weights, source=self.path)
            models.append(model)
        return models


def _is_transformer_dir(path: str) -> bool:
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and _read_json(config).get("_class_name") == _TRANSFORMER


def _is_pipeline_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def resolve_teacher(teacher: str, pipeline: str = "") -> TeacherSource:
    """One-line ConfigError when the path is none of the three kinds."""
    from adm_megatron.convert.checkpoint import is_megatron_checkpoint, read_checkpoint_arch

    if not os.path.isdir(teacher):
        raise ConfigError(f"model.teacher={teacher!r}: directory not found")
    if pipeline and not _is_pipeline_dir(pipeline):
        raise ConfigError(f"model.pipeline={pipeline!r}: not a diffusers pipeline directory (no model_index.json)")
    try:
        if _is_pipeline_dir(teacher):
            transformer = os.path.join(teacher, "transformer")
            if not _is_transformer_dir(transformer):
                raise ConfigError(f"model.teacher={teacher!r}: pipeline has no {_TRANSFORMER} in transformer/")
            return TeacherSource("diffusers", transformer, pipeline or teacher,
                                 CogVideoXArch.from_pretrained_dir(transformer))
        if _is_transformer_dir(teacher):
            return TeacherSource("diffusers", teacher, pipeline, CogVideoXArch.from_pretrained_dir(teacher))
        if is_megatron_checkpoint(teacher):
            return TeacherSource("megatron", teacher, pipeline, read_checkpoint_arch(teacher))
    except ValueError as err:
        raise ConfigError(f"model.teacher={teacher!r}: {err}") from None
    raise ConfigError(
        f"model.teacher={teacher!r}: expected a diffusers {_TRANSFORMER} or CogVideoXPipeline "
        "directory, or a megatron checkpoint from tools/convert_checkpoint.py"
    )
