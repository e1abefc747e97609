"""The weight files of a diffusers model directory: reading its (single or sharded) safetensors into
a state dict, and cheap checks of the files before anything expensive reads them."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from adm_megatron.data.safetensors_rows import check_safetensors_file
from adm_megatron.file_fingerprint import file_fingerprint

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = _WEIGHTS + ".index.json"


def read_diffusers_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model directory (single or sharded safetensors), on CPU."""
    state = {}
    for file in weight_files(path):
        state.update(load_file(file))
    return state


def transformer_fingerprint(path: str) -> str:
    """The cheap fingerprint (``adm_megatron/file_fingerprint.py``) of a diffusers model directory's
    weight files: what a run records of the frozen transformers it reads (teacher, generator_init)."""
    return file_fingerprint(path, weight_files(path))


def diffusers_weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a diffusers model directory with its shape, from the safetensors headers only."""
    return {name: tuple(tensor["shape"]) for file in weight_files(path)
            for name, tensor in check_safetensors_file(file)[0].items()}


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def weights_dtype(path: str) -> torch.dtype:
    """The floating dtype of a diffusers model directory's weights, from the safetensors headers
    alone: the one they all have, float32 when they mix (every float16 / bfloat16 value is exact in it)."""
    found = {tensor["dtype"] for file in weight_files(path) for tensor in check_safetensors_file(file)[0].values()}
    return _TORCH_DTYPES[found.pop()] if len(found) == 1 and found <= _TORCH_DTYPES.keys() else torch.float32


def weight_files(path: str) -> list[str]:
    """The safetensors files of a diffusers model directory: the shards its index names, else the one
    file. The index first, as diffusers' ``from_pretrained`` reads it: a sharded ``save_pretrained``
    into a directory leaves an earlier single file there, stale."""
    single, index = os.path.join(path, _WEIGHTS), os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither {_WEIGHTS} nor {_INDEX} found (a diffusers model directory expected)")


def check_diffusers_weights(path: str) -> None:
    """Cheap checks of a diffusers directory's safetensors files, reading only their headers: each
    file present, its header readable, and the file as long as the header says. One-line
    ValueError naming the file (a truncated download or copy is the usual cause)."""
    for file in weight_files(path):
        if not os.path.isfile(file):
            raise ValueError(f"{file}: missing (listed in {_INDEX})")
        check_safetensors_file(file)
