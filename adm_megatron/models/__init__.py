"""DiT backbones on megatron-core (CogVideoX 2b / 5b, SD3-Medium / SD3.5); the model-family interface
over them is ``adm_megatron.families``."""

from adm_megatron.models.build import build_model, build_model_from_hf, build_sd3_model
from adm_megatron.models.cogvideox import CogVideoXOutput, CogVideoXTransformer
from adm_megatron.models.cogvideox_config import CogVideoXArch
from adm_megatron.models.diffusers_files import read_diffusers_weights
from adm_megatron.models.sd3 import SD3Output, SD3Transformer
from adm_megatron.models.sd3_config import SD3Arch
from adm_megatron.models.taps import tapped_block_indices

__all__ = [
    "CogVideoXArch",
    "CogVideoXOutput",
    "CogVideoXTransformer",
    "SD3Arch",
    "SD3Output",
    "SD3Transformer",
    "build_model",
    "build_model_from_hf",
    "build_sd3_model",
    "read_diffusers_weights",
    "tapped_block_indices",
]
