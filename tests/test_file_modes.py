"""What others on a cluster read gets the modes the umask gives: safetensors (0.8) and mkdtemp create
owner-only files, and an exported generator's weights were 0600 -- unreadable to the rest of a
group sharing it. Checked for an exported generator, a megatron -> diffusers conversion, ODE-pair
shards and prompt-embedding shards, under a umask of 027."""

from __future__ import annotations

import os
import stat

import torch

UMASK = 0o027


def _modes(directory: str) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def _assert_umask_modes(directory: str) -> None:
    modes = _modes(directory)
    assert any(name.endswith(".safetensors") for name in modes), modes
    for name, mode in modes.items():
        want = 0o750 if os.path.isdir(os.path.join(directory, name)) else 0o640
        assert mode == want, (directory, name, oct(mode))


def test_outputs_get_the_modes_the_umask_gives(cogvideox_pipeline, tmp_path, world_of_one):
    from adm_megatron.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint
    from adm_megatron.data.ode_pairs import write_shard
    from adm_megatron.data.text_embeddings import write_embedding_shards
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    model = build_model_from_hf(f"{cogvideox_pipeline}/transformer")
    previous = os.umask(UMASK)
    try:
        generator = export_generator(model, model.arch, str(tmp_path / "generator"))
        hf_to_megatron_checkpoint(generator, str(tmp_path / "meg"))
        converted = megatron_to_hf_checkpoint(str(tmp_path / "meg"), str(tmp_path / "hf"))
        os.makedirs(tmp_path / "pairs")
        write_shard(str(tmp_path / "pairs"), 0, {"x_T": torch.zeros(1, 2), "x_0": torch.zeros(1, 2),
                                                 "prompt_id": torch.zeros(1, dtype=torch.long),
                                                 "guidance_scale": torch.ones(1)})
        embeddings = write_embedding_shards(str(tmp_path / "embeddings"), ["a", "b"], torch.zeros(2, 3, 4),
                                            torch.zeros(3, 4))
    finally:
        os.umask(previous)
    for directory in (generator, converted, str(tmp_path / "pairs"), embeddings):
        _assert_umask_modes(directory)
