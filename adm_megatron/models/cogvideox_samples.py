"""Sample videos from a (distilled) CogVideoX transformer, written as gif, mp4 or png files (png:
the frames side by side).

:func:`render_samples` runs diffusers' ``CogVideoXPipeline`` from a pipeline directory (VAE and
scheduler; the text encoder is never loaded -- prompts come as precomputed embeddings) with the
transformer swapped for the one in ``transformer_dir``. Sampling uses a ``CogVideoXDDIMScheduler``
built from the pipeline's scheduler config (also where the pipeline ships the stochastic
``CogVideoXDPMScheduler``, as CogVideoX-5b does): its deterministic, 'trailing'-spaced N-step
DDIM is the PF-ODE schedule the generator is distilled on. :func:`video_shape` reads the pixel and
latent video sizes from the component configs without loading weights.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from adm_megatron.dtype_keyword import dtype_keyword
from adm_megatron.families.cogvideox_presets import SAMPLER_SCHEDULER
from adm_megatron.models.frame_files import FORMATS, sample_name, write_frames
from adm_megatron.models.generator_source import generator_parts, load_lora
from adm_megatron.models.pipeline_files import component_config, read_config



@dataclasses.dataclass(frozen=True)
class VideoShape:
    """Default video size of a pipeline: pixels ``(frames, height, width)`` and latents
    ``(latent_channels, latent_frames, latent_height, latent_width)``."""

    frames: int
    height: int
    width: int
    latent_channels: int
    latent_frames: int
    latent_height: int
    latent_width: int


def video_shape(pipeline_dir: str, transformer_dir: str | None = None) -> VideoShape:
    """The pipeline's default video size, as ``CogVideoXPipeline.__call__`` derives it."""
    transformer = (read_config(transformer_dir, "config.json", "transformer") if transformer_dir
                   else component_config(pipeline_dir, "transformer"))
    vae = component_config(pipeline_dir, "vae")
    spatial = 2 ** (len(vae["block_out_channels"]) - 1)
    frames = transformer["sample_frames"]
    return VideoShape(
        frames=frames,
        height=transformer["sample_height"] * spatial,
        width=transformer["sample_width"] * spatial,
        latent_channels=transformer["in_channels"],
        latent_frames=(frames - 1) // vae["temporal_compression_ratio"] + 1,
        latent_height=transformer["sample_height"],
        latent_width=transformer["sample_width"],
    )


def _load_pipeline(pipeline_dir: str, transformer_dir: str | None, dtype: torch.dtype, device,
                   vae_tiling: bool = False):
    import diffusers
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from adm_megatron.diffusion import VPVPredSchedule

    read_config(pipeline_dir, "model_index.json", "pipeline index")
    component_config(pipeline_dir, "vae")
    scheduler_config = component_config(pipeline_dir, "scheduler", "scheduler_config.json")
    try:  # the generator's PF-ODE schedule, or a one-line error
        VPVPredSchedule.from_diffusers_config(scheduler_config)
    except ValueError as err:
        raise ValueError(f"{os.path.join(pipeline_dir, 'scheduler', 'scheduler_config.json')}: {err}") from None
    transformer_dir, lora_dir = generator_parts(pipeline_dir, transformer_dir)
    read_config(transformer_dir, "config.json", "transformer")
    transformer = CogVideoXTransformer3DModel.from_pretrained(transformer_dir, **dtype_keyword("diffusers", dtype))
    pipeline = CogVideoXPipeline.from_pretrained(
        pipeline_dir, transformer=transformer, text_encoder=None, tokenizer=None, **dtype_keyword("diffusers", dtype))
    if lora_dir is not None:
        load_lora(pipeline, lora_dir)
    pipeline.scheduler = getattr(diffusers, SAMPLER_SCHEDULER).from_config(scheduler_config)
    if vae_tiling:
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def render_samples(
    pipeline_dir: str,
    transformer_dir: str | None,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_inference_steps: int,
    out_dir: str,
    fmt: str = "gif",
    guidance_scale: float = 1.0,
    seed: int = 0,
    fps: int = 8,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seconds: list[float] | None = None,
    first: int = 0,
    vae_tiling: bool = False,
) -> list[str]:
    """One video per row of ``prompt_embeds`` ``[B, L, D]``: row ``j`` is sample ``i = first + j``,
    written to ``out_dir/sample-{i:03d}.{fmt}``.

    Sample ``i`` starts from noise seeded by ``seed + i``, so it does not depend on the other rows
    (a set of prompts split into parts renders as it does whole).
    ``negative_embeds`` (``[L, D]`` or ``[B, L, D]``) is the unconditional input, used only when
    ``guidance_scale > 1``. ``transformer_dir`` ``None`` samples the pipeline's own transformer.
    Size defaults to :func:`video_shape`; returns the written paths. ``seconds``, when given,
    receives each sample's generation time (the pipeline call, not the file write).
    ``vae_tiling``: the VAE decodes in overlapping tiles (diffusers' ``enable_tiling``: at
    CogVideoX's 49 x 480 x 720 about a quarter of the memory, with blended seams).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if prompt_embeds.dim() != 3:
        raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(prompt_embeds.shape)}")
    batch = prompt_embeds.shape[0]
    if guidance_scale > 1.0:
        if negative_embeds is None:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 needs negative_embeds")
        if negative_embeds.dim() == 2:
            negative_embeds = negative_embeds.unsqueeze(0).expand(batch, -1, -1)
        if negative_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_embeds shape {tuple(negative_embeds.shape)} does not match "
                             f"prompt_embeds {tuple(prompt_embeds.shape)}")
    pipeline = _load_pipeline(pipeline_dir, transformer_dir, dtype, device, vae_tiling)
    text_dim = pipeline.transformer.config.text_embed_dim
    if prompt_embeds.shape[-1] != text_dim:
        raise ValueError(
            f"prompt_embeds width {prompt_embeds.shape[-1]} != the transformer's text_embed_dim {text_dim}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for j in range(batch):
        i = first + j
        negative = negative_embeds[j : j + 1].to(device, dtype) if guidance_scale > 1.0 else None
        start = time.perf_counter()
        video = pipeline(
            prompt_embeds=prompt_embeds[j : j + 1].to(device, dtype),
            negative_prompt_embeds=negative,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_frames=num_frames,
            generator=torch.Generator(device).manual_seed(seed + i),
            output_type="np",
        ).frames[0]
        if seconds is not None:  # the frames are numpy on the host: the device work is done
            seconds.append(time.perf_counter() - start)
        paths.append(os.path.join(out_dir, sample_name(i, fmt)))
        write_frames(video, paths[-1], fmt, fps)
    return paths
