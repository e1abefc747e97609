"""Sampling the toy models with the project's own PF-ODE code (``adm_megatron.diffusion``).

A diffusers ``CogVideoXTransformer3DModel`` becomes ``model_fn(x_t, t, text)``; the N-step sampler
is :func:`adm_megatron.diffusion.rollout` on ``schedule.inference_timesteps(N)`` (trailing DDIM,
the schedule the generators are distilled on), optionally with classifier-free guidance
(:func:`adm_megatron.diffusion.guidance.cfg_model_output`). Starting noise comes from one seeded
generator for the whole set, so two methods sampled with the same seed start from the same noise.
"""

from __future__ import annotations

import torch

from adm_megatron.diffusion.guidance import cfg_model_output
from adm_megatron.diffusion.rollout import rollout
from adm_megatron.toy.data import LATENT_SHAPE


def model_fn(model):
    def fn(x_t, t, text):
        return model(hidden_states=x_t, encoder_hidden_states=text, timestep=t).sample

    return fn


def guided_fn(model, negative: torch.Tensor, scale: float):
    base = model_fn(model)

    def fn(x_t, t, text):
        uncond = negative.unsqueeze(0).expand_as(text)
        return cfg_model_output(base, x_t, t, text, uncond, scale)

    return fn


@torch.no_grad()
def sample(
    model,
    schedule,
    labels: torch.Tensor,
    embeddings: torch.Tensor,
    steps: int,
    seed: int,
    negative: torch.Tensor | None = None,
    guidance: float = 1.0,
    batch_size: int = 512,
) -> torch.Tensor:
    """``[N, F, C, H, W]`` samples of classes ``labels`` with ``steps`` PF-ODE steps."""
    fn = guided_fn(model, negative, guidance) if guidance != 1.0 else model_fn(model)
    return sample_fn(fn, schedule, labels, embeddings, steps, seed, batch_size)


@torch.no_grad()
def sample_fn(fn, schedule, labels: torch.Tensor, embeddings: torch.Tensor, steps: int, seed: int,
              batch_size: int = 512) -> torch.Tensor:
    """:func:`sample` for any ``fn(x_t, t, text) -> model output`` (e.g. a trainer's generator)."""
    noise = torch.randn(len(labels), *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))
    timesteps = schedule.inference_timesteps(steps)
    out = []
    for z, lab in zip(noise.split(batch_size), labels.split(batch_size)):
        out.append(rollout(fn, schedule, z, embeddings[lab], timesteps))
    return torch.cat(out)
