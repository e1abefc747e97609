"""DiT backbones on megatron-core (CogVideoX 2b / 5b); the model-family interface over them is
``adm_megatron.families``."""

from adm_megatron.models.build import build_model, build_model_from_hf, read_diffusers_weights
from adm_megatron.models.cogvideox import CogVideoXOutput, CogVideoXTransformer
from adm_megatron.models.taps import tapped_block_indices
from adm_megatron.models.cogvideox_config import CogVideoXArch

__all__ = [
    "CogVideoXArch",
    "CogVideoXOutput",
    "CogVideoXTransformer",
    "build_model",
    "build_model_from_hf",
    "read_diffusers_weights",
    "tapped_block_indices",
]
