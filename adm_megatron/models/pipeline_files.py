"""Reading the JSON configs of a diffusers pipeline directory (``model_index.json``, each
component's ``config.json`` / ``scheduler_config.json``) with one-line errors naming the file,
before any weights are loaded."""

from __future__ import annotations

import json
import os


def read_config(directory: str, name: str, what: str) -> dict:
    """``directory/name`` as a dict; FileNotFoundError naming the file and ``what`` it is."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found ({what})")
    with open(path) as f:
        return json.load(f)


def missing_components(pipeline_dir: str, index: dict, names=None) -> list[str]:
    """The components the pipeline's ``model_index.json`` (``index``) lists -- not as null, which is
    one left out on purpose -- that have no directory in ``pipeline_dir``; of ``names`` only, when
    given. diffusers' own error names none of them, after loading the others."""
    return [name for name in (index if names is None else names) if isinstance(index.get(name), list)
            and index[name] != [None, None] and not os.path.isdir(os.path.join(pipeline_dir, name))]


def component_config(pipeline_dir: str, name: str, config: str = "config.json") -> dict:
    """The config of the pipeline component ``name`` (``vae``, ``scheduler``, ``transformer`` ...)."""
    return read_config(os.path.join(pipeline_dir, name), config, f"pipeline component {name!r}")
