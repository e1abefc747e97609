"""Tiny random CogVideoX teachers (diffusers directories) and helpers shared by the model tests."""

from __future__ import annotations

import os

import torch

from adm_megatron.models import CogVideoXArch
from adm_megatron.models.rotary import cogvideox_rotary_emb

TINY_2B = dict(
    num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
)
TINY_5B = dict(TINY_2B, attention_head_dim=16, use_rotary_positional_embeddings=True)
VARIANTS = {"2b": TINY_2B, "5b": TINY_5B}


def perturbed_model(model_cls, config: dict, seed: int):
    """A tiny diffusers model with every weight perturbed (zero-initialised gates and projections
    and unit norms would otherwise hide mapping mistakes)."""
    torch.manual_seed(seed)
    model = model_cls(**config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def make_diffusers_model(variant: str, seed: int = 0, **overrides):
    from diffusers import CogVideoXTransformer3DModel

    return perturbed_model(CogVideoXTransformer3DModel, {**VARIANTS[variant], **overrides}, seed)


def saved_once(make, name: str, directory: str) -> str:
    """``directory/name``, written by ``make().save_pretrained`` unless it exists."""
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
        make().save_pretrained(path)
    return path


def save_diffusers_model(variant: str, directory: str, seed: int = 0, **overrides) -> str:
    return saved_once(lambda: make_diffusers_model(variant, seed, **overrides), f"tiny-{variant}-{seed}", directory)


def make_inputs(model_config, batch: int, frames: int, height: int, width: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, model_config.in_channels, height, width, generator=g)
    text = torch.randn(batch, model_config.max_text_seq_length, model_config.text_embed_dim, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    arch = model_config if isinstance(model_config, CogVideoXArch) else (
        CogVideoXArch.from_diffusers_config(dict(model_config)))
    rotary = cogvideox_rotary_emb(arch, frames, height, width)
    weight = torch.randn(batch, frames, model_config.out_channels, height, width, generator=g)
    return latents, text, timestep, rotary, weight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_grads_match(grads: dict, ref_grads: dict, tol: float, context=None) -> None:
    """Every gradient within ``tol`` relative error, per tensor. A reference gradient below
    ``tol`` x the largest gradient entry is numerically zero (e.g. the key-norm bias without RoPE:
    softmax ignores the constant q.b it adds to every logit); there both sides must stay below it."""
    assert grads.keys() == ref_grads.keys()
    zero = tol * max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        if ref.abs().max().item() <= zero:
            assert grads[name].abs().max().item() <= zero, (context, name)
        else:
            err = rel_err(grads[name], ref)
            assert err <= tol, (context, name, err)
