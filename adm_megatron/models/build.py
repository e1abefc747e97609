"""Building the megatron CogVideoX for the current parallel layout, from an architecture or from a
diffusers model directory.

``build_model_from_hf(dir)`` is the one-call entry (for any registered model family, by the
directory's ``_class_name``): it sets up a world of one when no process groups exist yet, builds the
model for the layout in force (TP / SP / CP from megatron's parallel_state), and loads the diffusers
weights, each rank taking its own tensor-parallel shard.
"""

from __future__ import annotations

import json
import os

import torch
from megatron.core import parallel_state
from safetensors.torch import load_file

from adm_megatron.models.cogvideox import CogVideoXTransformer
from adm_megatron.models.cogvideox_config import CogVideoXArch, make_transformer_config
from adm_megatron.models.specs import select_spec
from adm_megatron.parallel import ensure_parallel, get_device

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = _WEIGHTS + ".index.json"


def check_layout(arch: CogVideoXArch, tensor_parallel: int, context_parallel: int) -> None:
    """One-line errors for layouts the architecture cannot take (before any tensor is built)."""
    if arch.num_attention_heads % tensor_parallel:
        raise ValueError(
            f"num_attention_heads={arch.num_attention_heads}: not divisible by "
            f"tensor_parallel={tensor_parallel}"
        )
    if arch.ffn_hidden_size % tensor_parallel:
        raise ValueError(
            f"ffn hidden size {arch.ffn_hidden_size}: not divisible by tensor_parallel={tensor_parallel}"
        )


def build_model(
    arch: CogVideoXArch,
    *,
    sequence_parallel: bool = False,
    recompute: bool = False,
    params_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    device: torch.device | str | None = None,
) -> CogVideoXTransformer:
    """A randomly initialised model for the parallel layout in force (a world of one if none).

    ``device='meta'`` builds without allocating memory (shapes and parameter counts only).
    """
    ensure_parallel()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    check_layout(arch, tp, cp)
    config = make_transformer_config(
        arch,
        tensor_parallel=tp,
        context_parallel=cp,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
    )
    target = torch.device(device) if device is not None else get_device()
    if target.type == "meta":
        with torch.device("meta"):
            return CogVideoXTransformer(arch, config, select_spec("local" if impl == "auto" else impl))
    return CogVideoXTransformer(arch, config, select_spec(impl)).to(target)


def read_diffusers_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model directory (single or sharded safetensors), on CPU."""
    state = {}
    for file in _weight_files(path):
        state.update(load_file(file))
    return state


def _weight_files(path: str) -> list[str]:
    single, index = os.path.join(path, _WEIGHTS), os.path.join(path, _INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    raise FileNotFoundError(f"{path}: neither {_WEIGHTS} nor {_INDEX} found (a diffusers model directory expected)")


def check_diffusers_weights(path: str) -> None:
    """Cheap checks of a diffusers directory's safetensors files, reading only their headers: each
    file present, its header readable, and the file as long as the header says. One-line
    ValueError naming the file (a truncated download or copy is the usual cause)."""
    for file in _weight_files(path):
        if not os.path.isfile(file):
            raise ValueError(f"{file}: missing (listed in {_INDEX})")
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if size < 8 or 8 + length > size:
                    raise ValueError("header cut short")
                header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{file}: not a readable safetensors file ({size} bytes; truncated?)") from None
        if size < 8 + length + end:
            raise ValueError(f"{file}: truncated ({size} bytes, its header needs {8 + length + end})")


def load_hf_weights(hf_dir: str, arch) -> dict[str, torch.Tensor]:
    """The full (unsharded) megatron-named weights of a diffusers directory of ``arch``'s family."""
    from adm_megatron.families import family_of_arch

    return family_of_arch(arch).load_hf_weights(hf_dir, arch)


def build_model_from_hf(hf_dir: str, **kwargs):
    """The megatron model with the weights of a diffusers transformer directory
    (``save_pretrained`` output) of any registered family, for the current parallel layout.
    ``kwargs`` as the family's ``build_model``."""
    from adm_megatron.families import family_of_model_dir

    return family_of_model_dir(hf_dir).build_model_from_hf(hf_dir, **kwargs)
