"""Each family's pipeline decode, latents -> pixels, for ADP's pixel discriminator: the pipeline's
own latent scaling, then its VAE's ``decode``, with every video frame returned as an image
``[N, 3, h, w]`` in about [-1, 1] (the values before the pipelines' postprocess maps them to [0, 1]).
Differentiable: the generator's gradient flows through the decode to its latents."""

from __future__ import annotations

import torch


def decode_cogvideox_frames(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` -> ``[B F', 3, h, w]``: ``CogVideoXPipeline.decode_latents`` (channels first,
    times ``1 / scaling_factor``, ``AutoencoderKLCogVideoX.decode``), then the frames of each video in order."""
    video = vae.decode(1 / vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4)).sample  # [B, 3, F', h, w]
    return video.permute(0, 2, 1, 3, 4).reshape(-1, *video.shape[1:2], *video.shape[3:])


def decode_sd3_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, 3, h, w]``: ``StableDiffusion3Pipeline``'s decode
    (``latents / scaling_factor + shift_factor``, ``AutoencoderKL.decode``)."""
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
