"""Hugging Face repo ids where a model directory is expected (hub_cache.py): a repo in the local hub
cache is its snapshot directory, as diffusers' ``from_pretrained`` reads it; one not cached is refused
in one line saying where it was looked for, and nothing is downloaded; a path on disk stays a path."""

from __future__ import annotations

import os
import shutil

import pytest

from adm_megatron.config import ConfigError, load_config


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A hub cache holding ``org/tiny-cogvideox`` (a tiny CogVideoX pipeline) at commit ``abc``."""
    from huggingface_hub import constants

    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-cogvideox"
    build_tiny_pipeline(str(repo / "snapshots" / "abc"), seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return str(cache), str(repo / "snapshots" / "abc")


def test_a_cached_repo_id_is_its_snapshot_and_an_uncached_one_is_refused_in_one_line(hub, tmp_path, monkeypatch):
    from adm_megatron.train.teacher import resolve_teacher

    cache, snapshot = hub
    config = load_config(None, ["model.teacher=org/tiny-cogvideox", "model.generator_init=org/tiny-cogvideox"])
    assert config.model.teacher == config.model.generator_init == snapshot
    assert resolve_teacher(config.model.teacher).pipeline_dir == snapshot

    config = load_config(None, ["model.teacher=org/elsewhere"])  # not cached: kept, refused where it is read
    assert config.model.teacher == "org/elsewhere"
    with pytest.raises(ConfigError) as err:
        resolve_teacher(config.model.teacher)
    assert str(err.value) == (f"model.teacher='org/elsewhere': directory not found (relative to the working "
                              f"directory {os.getcwd()}), nor a Hugging Face repo in the local cache {cache} (nothing "
                              "is downloaded: `hf download org/elsewhere` where there is network, or set HF_HUB_CACHE)")

    monkeypatch.chdir(tmp_path)  # a directory on disk is a path, whatever the cache holds
    shutil.copytree(snapshot, tmp_path / "org" / "tiny-cogvideox")
    assert load_config(None, ["model.teacher=org/tiny-cogvideox"]).model.teacher == "org/tiny-cogvideox"
    assert "nor a Hugging Face repo" not in str(pytest.raises(ConfigError, resolve_teacher, "nowhere").value)
    # a relative path under a directory that exists here (outputs/tiny_teacher before it is made) is a path
    (tmp_path / "outputs").mkdir()
    assert str(pytest.raises(ConfigError, resolve_teacher, "outputs/tiny_teacher").value) == (
        f"model.teacher='outputs/tiny_teacher': directory not found (relative to the working directory {tmp_path})")


def test_sample_takes_a_cached_pipeline_by_its_repo_id(hub, tmp_path, capsys):
    from adm_megatron.cli import main

    cache, snapshot = hub
    out = tmp_path / "samples"
    assert main(["sample", "--pipeline", "org/tiny-cogvideox", "--generator", f"{snapshot}/transformer", "--steps",
                 "1", "--teacher-steps", "0", "--prompt", "x", "--format", "gif", "--out", str(out)]) == 0
    assert os.listdir(out / "generator")
    assert main(["sample", "--pipeline", "org/elsewhere", "--generator", f"{snapshot}/transformer", "--steps", "1",
                 "--teacher-steps", "0", "--prompt", "x", "--out", str(tmp_path / "other")]) == 2
    assert (f"adm-megatron sample: --pipeline org/elsewhere: not found (relative to the working directory "
            f"{os.getcwd()}), nor a Hugging Face repo in the local cache {cache}") in capsys.readouterr().err
