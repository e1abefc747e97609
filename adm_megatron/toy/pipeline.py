"""The toy teacher on disk: a diffusers pipeline directory the trainer takes as ``model.teacher``.

Layout (``assets/toy_teacher/``)::

    model_index.json           CogVideoXPipeline; vae / text encoder / tokenizer are null
    transformer/               CogVideoXTransformer3DModel (config.json + safetensors)
    scheduler/                 CogVideoXDDIMScheduler with the CogVideoX-2b settings
    prompts/                   text-embedding shards: one row per class ('class k') + negative
    training.json              how the teacher was trained (command, seed, steps, seconds)

There is no VAE: the toy latents are the data, and the study renders them to PNG directly
(``train.num_samples=0`` in the toy configs, so the trainer renders no videos).
"""

from __future__ import annotations

import json
import os

import torch

from adm_megatron.families.cogvideox_presets import COGVIDEOX_2B_SCHEDULER
from adm_megatron.toy.data import FRAMES, HEIGHT, WIDTH

TEXT_LEN, TEXT_DIM = 4, 32
TOY_TRANSFORMER = dict(
    num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=64,
    text_embed_dim=TEXT_DIM, num_layers=3, sample_width=WIDTH, sample_height=HEIGHT,
    sample_frames=(FRAMES - 1) * 4 + 1, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=TEXT_LEN,
)


def build_transformer(seed: int = 0, **overrides):
    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CogVideoXTransformer3DModel(**{**TOY_TRANSFORMER, **overrides})


def _transformer_dir(path: str) -> str:
    """The transformer directory of ``path``: a pipeline dir's ``transformer/``, or ``path`` itself."""
    return os.path.join(path, "transformer") if os.path.isfile(os.path.join(path, "model_index.json")) else path


def transformer_config(path: str) -> dict:
    """The ``config.json`` of the transformer in ``path`` (a pipeline dir or a transformer dir);
    ``read_model_config``'s one-line errors."""
    from adm_megatron.families.registry import read_model_config

    return read_model_config(_transformer_dir(path))


def load_transformer(path: str):
    """A diffusers ``CogVideoXTransformer3DModel`` (a pipeline dir or a transformer dir), eval mode."""
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(_transformer_dir(path), low_cpu_mem_usage=False).eval().requires_grad_(False)


def schedule():
    from adm_megatron.diffusion import VPVPredSchedule

    return VPVPredSchedule.from_diffusers_config(COGVIDEOX_2B_SCHEDULER)


def save_pipeline(out_dir: str, transformer, info: dict | None = None) -> str:
    """Write the teacher pipeline directory (without the prompt shards: :func:`save_prompts`)."""
    import diffusers
    from diffusers import CogVideoXDDIMScheduler

    os.makedirs(out_dir, exist_ok=True)
    transformer.save_pretrained(os.path.join(out_dir, "transformer"))
    CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER).save_pretrained(os.path.join(out_dir, "scheduler"))
    index = {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": [None, None],
    }
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if info is not None:
        with open(os.path.join(out_dir, "training.json"), "w") as f:
            json.dump(info, f, indent=2)
    return out_dir


def save_prompts(out_dir: str, embeddings: torch.Tensor, negative: torch.Tensor) -> str:
    from adm_megatron.data import write_embedding_shards
    from adm_megatron.toy.data import class_prompts

    return write_embedding_shards(out_dir, class_prompts(), embeddings, negative,
                                  encoder="toy: fixed random per class", overwrite=True)


def load_prompts(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings [K, L, D], negative [L, D])`` from a pipeline dir's ``prompts/`` (or the
    shard dir itself)."""
    from adm_megatron.data import TextEmbeddingShards

    if os.path.isdir(os.path.join(path, "prompts")):
        path = os.path.join(path, "prompts")
    shards = TextEmbeddingShards(path)
    return shards.get(torch.arange(len(shards))).float(), shards.negative().float()
