"""Sample images from a (distilled) SD3 / SD3.5 transformer through the real
``StableDiffusion3Pipeline``, written as PNG files.

:func:`render_image_samples` loads the pipeline from its directory without the text encoders
(prompts come as precomputed embeddings with their pooled part, see ``data/encode_sd3.py``) and
with the transformer swapped for the one in ``transformer_dir``. The pipeline's own
``FlowMatchEulerDiscreteScheduler`` is the generator's N-step schedule (``FlowMatchSchedule``
equals it), so the pipeline called with ``num_inference_steps = N`` is the distilled sampler.
"""

from __future__ import annotations

import os
import time

import torch

from adm_megatron.dtype_keyword import dtype_keyword
from adm_megatron.models.frame_files import sample_name, write_frames
from adm_megatron.models.generator_source import generator_parts, load_lora
from adm_megatron.models.pipeline_files import component_config, read_config

_NO_TEXT_ENCODERS = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                         text_encoder_3=None, tokenizer_3=None)


def _load_pipeline(pipeline_dir: str, transformer_dir: str | None, dtype: torch.dtype, device,
                   vae_tiling: bool = False):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from adm_megatron.diffusion import FlowMatchSchedule

    read_config(pipeline_dir, "model_index.json", "pipeline index")
    component_config(pipeline_dir, "vae")
    scheduler_config = component_config(pipeline_dir, "scheduler", "scheduler_config.json")
    try:  # the generator's schedule, or a one-line error
        FlowMatchSchedule.from_diffusers_config(scheduler_config)
    except ValueError as err:
        raise ValueError(f"{os.path.join(pipeline_dir, 'scheduler', 'scheduler_config.json')}: {err}") from None
    transformer_dir, lora_dir = generator_parts(pipeline_dir, transformer_dir)
    read_config(transformer_dir, "config.json", "transformer")
    transformer = SD3Transformer2DModel.from_pretrained(transformer_dir, **dtype_keyword("diffusers", dtype))
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        pipeline_dir, transformer=transformer, **dtype_keyword("diffusers", dtype), **_NO_TEXT_ENCODERS)
    if lora_dir is not None:
        load_lora(pipeline, lora_dir)
    if vae_tiling:
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _expand(negative: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    if negative is None:
        raise ValueError(f"guidance_scale > 1 needs {name}")
    if negative.dim() == like.dim() - 1:
        negative = negative.unsqueeze(0).expand_as(like)
    if negative.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(negative.shape)} does not match {tuple(like.shape)}")
    return negative


def render_image_samples(
    pipeline_dir: str,
    transformer_dir: str | None,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    num_inference_steps: int,
    out_dir: str,
    negative_embeds: torch.Tensor | None = None,
    negative_pooled: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seconds: list[float] | None = None,
    first: int = 0,
    vae_tiling: bool = False,
) -> list[str]:
    """One image per row of ``prompt_embeds`` ``[B, L, D]`` / ``pooled_embeds`` ``[B, P]``: row ``j``
    is sample ``i = first + j``, written to ``out_dir/sample-{i:03d}.png``, from noise seeded by
    ``seed + i`` (so a set of prompts split into parts renders as it does whole). The negatives
    (``[L, D]`` / ``[P]`` or batched) are read only when ``guidance_scale > 1``. ``seconds``, when
    given, receives each sample's generation time. ``vae_tiling``: diffusers' tiled VAE decode (which
    only tiles images larger than the VAE's ``sample_size``, 1024 for SD3)."""
    if prompt_embeds.dim() != 3 or pooled_embeds.dim() != 2 or len(prompt_embeds) != len(pooled_embeds):
        raise ValueError(f"prompt_embeds must be [B, L, D] and pooled_embeds [B, P], got "
                         f"{tuple(prompt_embeds.shape)} and {tuple(pooled_embeds.shape)}")
    guided = guidance_scale > 1.0
    if guided:
        negative_embeds = _expand(negative_embeds, prompt_embeds, "negative_embeds")
        negative_pooled = _expand(negative_pooled, pooled_embeds, "negative_pooled")
    pipeline = _load_pipeline(pipeline_dir, transformer_dir, dtype, device, vae_tiling)
    config = pipeline.transformer.config
    if prompt_embeds.shape[-1] != config.joint_attention_dim or pooled_embeds.shape[-1] != config.pooled_projection_dim:
        raise ValueError(f"embedding widths {prompt_embeds.shape[-1]} / {pooled_embeds.shape[-1]} != the "
                         f"transformer's joint_attention_dim {config.joint_attention_dim} / "
                         f"pooled_projection_dim {config.pooled_projection_dim}")
    os.makedirs(out_dir, exist_ok=True)
    to = dict(device=device, dtype=dtype)
    paths = []
    for j in range(len(prompt_embeds)):
        i = first + j
        start = time.perf_counter()
        image = pipeline(
            prompt_embeds=prompt_embeds[j : j + 1].to(**to),
            pooled_prompt_embeds=pooled_embeds[j : j + 1].to(**to),
            negative_prompt_embeds=negative_embeds[j : j + 1].to(**to) if guided else None,
            negative_pooled_prompt_embeds=negative_pooled[j : j + 1].to(**to) if guided else None,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=torch.Generator(device).manual_seed(seed + i),
            output_type="np",
        ).images[0]
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
        paths.append(os.path.join(out_dir, sample_name(i, "png")))
        write_frames(image[None], paths[-1], "png")
    return paths
