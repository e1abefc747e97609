"""README, the user manual, against the code: it names every key a run config takes
(``adm_megatron/config.py``), the defaults it states (in its prose and in its "Other run keys" table)
are the dataclasses' defaults, and the Python API its SD3 section names exists with the keyword
arguments it shows."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re

import pytest
import yaml

from adm_megatron.config import NETWORKS, Config, LoraConfig, ProfileConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _f:
    README = _f.read()
SECTIONS = {"model.lora": LoraConfig(), "logging.profile": ProfileConfig()}  # null by default


def _leaves(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f"{prefix}{f.name}" in SECTIONS:
            value = SECTIONS[f"{prefix}{f.name}"]
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


KEYS = dict(_leaves(Config()))


def _default(key: str):
    if key.startswith("optim.<network>."):  # one default for every network
        values = {repr(KEYS[key.replace("<network>", name)]) for name in NETWORKS}
        assert len(values) == 1, f"{key}: the networks' defaults differ: {values}"
        return KEYS[key.replace("<network>", NETWORKS[0])]
    return KEYS[key]


def _same(stated, default) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(default, float) and isinstance(stated, (int, float, str)) and not isinstance(stated, bool):
        return float(stated) == default
    return stated == default


@pytest.mark.parametrize("key", sorted(KEYS))
def test_readme_names_every_config_key(key):
    section, name = key.split(".")[0], key.split(".")[-1]
    forms = [key] + ([f"optim.<network>.{name}"] if section == "optim" else [])
    # in a code span of its own or among others (`logging.profile.start=10 logging.profile.end=12`)
    assert any(re.search(r"[` ]" + re.escape(form) + r"[`:= ]", README) for form in forms), \
        f"README does not name the config key {key}"


def _table() -> list[tuple[str, str]]:
    part = README.split("### Other run keys", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"^\| `([\w.<>]+)` \| ([^|]+) \|", part, re.MULTILINE)


def test_the_other_keys_table_states_the_defaults():
    rows = _table()
    assert len(rows) > 10
    for key, stated in rows:
        assert _same(yaml.safe_load(stated.strip().strip("`")), _default(key)), \
            f"README's Other run keys: {key} default {stated.strip()}, the config's {_default(key)!r}"


# defaults README states in its prose: (pattern capturing the stated value, key)
PROSE = [
    (r"`train\.num_samples` \((\S+?)\)", "train.num_samples"),
    (r"`logging\.dead_discriminator_window` \((\S+?)\)", "logging.dead_discriminator_window"),
    (r"`logging\.dead_discriminator_accuracy`\s+\((\S+?)\)", "logging.dead_discriminator_accuracy"),
    (r"`train\.max_skipped_steps` \((\S+?)\)", "train.max_skipped_steps"),
    (r"`parallel\.timeout_s` \((\S+?)\)", "parallel.timeout_s"),
    (r"`logging\.profile\.ranks` \(default `(\[[^\]]*\])`\)", "logging.profile.ranks"),
    (r"`logging\.profile\.mode: (\w+)` \(default\)", "logging.profile.mode"),
    (r"`distill\.gan_weight` (\S+) /", "distill.gan_weight"),
    (r"`distill\.cls_weight` (\S+) /", "distill.cls_weight"),
    (r"`distill\.dmd_t_range`\s+(\[[^\]]*\])", "distill.dmd_t_range"),
    (r"`distill\.gan_t_max` (\S+) are", "distill.gan_t_max"),
    (r"`distill\.latent_weight` ([\d.]+)", "distill.latent_weight"),
    (r"`distill\.pixel_weight` ([\d.]+)", "distill.pixel_weight"),
    (r"`distill\.pixel_layers` (\[[^\]]*\])", "distill.pixel_layers"),
    (r"`distill\.pixel_encoder`\s+`(\w+)` or", "distill.pixel_encoder"),
    (r"`(\w+)` \(default, a draw each\)", "distill.renoise"),
    (r"default\s+`distill\.head_every=(\d+)`", "distill.head_every"),
    (r"`model\.fp8_margin` (\S+?),", "model.fp8_margin"),
    (r"`model\.fp8_amax_history_len` (\S+?),", "model.fp8_amax_history_len"),
    (r"`model\.fp8: hybrid \| e4m3` \(default (\w+)\)", "model.fp8"),
    (r"`model\.grad_reduce_in_fp32: (\w+)`, the default", "model.grad_reduce_in_fp32"),
    (r"`model\.lora` \((\w+) by default", "model.lora"),
    (r"`parallel\.overlap_grad_reduce: true` \(default (\w+)\)", "parallel.overlap_grad_reduce"),
    (r"`optim\.<network>\.offload`: `(\w+)` \(default\)", "optim.<network>.offload"),
    (r"`optim\.<network>\.decay_style` `(\w+)` \(default\)", "optim.<network>.decay_style"),
    (r"`data\.global_batch_size` rows per update in\s+all \((\d+), the default", "data.global_batch_size"),
    (r"`train\.keep_checkpoints=K` keeps the\s+last K \((\d+), the default", "train.keep_checkpoints"),
    (r"\*\*`train\.resume`\*\*: `(\w+)` \(default\)", "train.resume"),
]


@pytest.mark.parametrize("pattern, key", PROSE, ids=[key for _, key in PROSE])
def test_the_defaults_readme_states_in_its_prose(pattern, key):
    found = re.search(pattern, README)
    assert found, f"README no longer states {key}'s default as /{pattern}/"
    default = None if key == "model.lora" else _default(key)
    assert _same(yaml.safe_load(found.group(1)), default), \
        f"README states {key} default {found.group(1)}, the config's {default!r}"


def test_the_sd3_sections_python_api_exists():
    part = README.split("## The SD3 / SD3.5 backbone", 1)[1].split("\n## ", 1)[0]
    models = importlib.import_module("adm_megatron.models")
    api = re.sub(r"\s+", " ", part.split("`adm_megatron.models` also holds", 1)[1].split("key mapping", 1)[0])
    calls = re.findall(r"`([\w.]+)\(([^`]*)\)`", api)
    assert len(calls) >= 3
    for name, args in calls:
        obj = models
        for attr in name.split("."):
            assert hasattr(obj, attr), f"README names adm_megatron.models.{name}, which does not exist"
            obj = getattr(obj, attr)
        params = inspect.signature(obj).parameters
        for kw in re.findall(r"(\w+)=", args):
            assert kw in params, f"README shows {name}({kw}=...), which it does not take"
    mapping = importlib.import_module("adm_megatron.convert.sd3_mapping")
    assert callable(mapping.hf_to_megatron) and callable(mapping.megatron_to_hf)
