"""A teacher's ``transformer/config.json`` and ``model_index.json`` read before any weights: a value of
the wrong type or range, or a file that is not a JSON object, is refused in one line naming the file
(and the key, its value and what is expected) -- for both families. These ended in tracebacks (a
TypeError in the run checks, a RuntimeError once the weights were read) or in a line naming no file."""

from __future__ import annotations

import json

import pytest

from adm_megatron.config import ConfigError
from adm_megatron.families.cogvideox_presets import COGVIDEOX_2B
from adm_megatron.families.sd3_presets import PRESETS as SD3_PRESETS
from adm_megatron.train.teacher import resolve_teacher

CONFIGS = {"cogvideox": COGVIDEOX_2B, "sd3": SD3_PRESETS["sd3.5-medium"]}


def _transformer(tmp_path, config) -> str:
    path = tmp_path / "transformer"
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def _refusal(teacher: str, pipeline: str = "") -> str:
    with pytest.raises(ConfigError) as err:
        resolve_teacher(teacher, pipeline)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("key, value, expected", [
    ("num_attention_heads", "four", '"four": expected a positive integer'),
    ("num_attention_heads", 0, "0: expected a positive integer"),
    ("patch_size", None, "null: expected a positive integer"),
    ("num_layers", 2.0, "2.0: expected a positive integer"),
    ("in_channels", True, "true: expected a positive integer"),
])
def test_a_config_value_of_the_wrong_type_or_range_is_named(tmp_path, family, key, value, expected):
    teacher = _transformer(tmp_path, {**CONFIGS[family], key: value})
    assert _refusal(teacher) == f"model.teacher={teacher!r}: {teacher}/config.json: {key}={expected}"


@pytest.mark.parametrize("family, key, value, expected", [
    ("cogvideox", "freq_shift", -1, "an integer >= 0"),
    ("cogvideox", "flip_sin_to_cos", "yes", "true or false"),
    ("cogvideox", "norm_eps", "1e-5", "a finite number >= 0"),
    ("sd3", "dual_attention_layers", 3, "a list of integers"),
    ("sd3", "qk_norm", 1, "a string or null"),
])
def test_other_field_types_are_checked(tmp_path, family, key, value, expected):
    teacher = _transformer(tmp_path, {**CONFIGS[family], key: value})
    assert _refusal(teacher).endswith(f"config.json: {key}={json.dumps(value)}: expected {expected}")


@pytest.mark.parametrize("content, problem", [("[]", "not a JSON object"), ("{oops", "unreadable")])
def test_a_config_json_that_is_not_an_object_is_named(tmp_path, content, problem):
    teacher = _transformer(tmp_path, content)
    assert _refusal(teacher).startswith(f"model.teacher={teacher!r}: {teacher}/config.json: {problem}")


def test_the_presets_and_a_null_out_channels_are_read(tmp_path):
    from adm_megatron.families import family_for_preset

    for name in ("cogvideox-2b", "cogvideox-5b", "sd3-medium", "sd3.5-large", "sd3.5-medium"):
        family, config = family_for_preset(name)
        family.arch_from_diffusers_config(config, name)
    teacher = _transformer(tmp_path, {**COGVIDEOX_2B, "in_channels": 8, "out_channels": None})
    assert resolve_teacher(teacher).arch.out_channels == 8


@pytest.mark.parametrize("content, problem", [("[]", "expected a JSON object, got list"), ("{oops", "not valid JSON")])
def test_a_model_index_that_is_not_an_object_is_named(tmp_path, content, problem):
    _transformer(tmp_path, COGVIDEOX_2B)
    index = tmp_path / "model_index.json"
    index.write_text(content)
    assert _refusal(str(tmp_path)).startswith(f"model.teacher={str(tmp_path)!r}: {index}: {problem}")
    other = tmp_path / "other"
    other.mkdir()
    assert _refusal(str(other), str(tmp_path)).startswith(f"model.pipeline={str(tmp_path)!r}: {index}: {problem}")
