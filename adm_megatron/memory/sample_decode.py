"""The run's samples in the memory plan (``train.num_samples`` > 0): their VAE decode, counted rather
than modelled. The pipeline's VAE (as the model family's VAE class, from its ``config.json``) is built
on fake tensors and the code a run's samples use (``train/samples.py``: ``sample_vae``, then
``decoded_pixels`` on one sample at the run's latent size, in the run's dtype, tiled with
``train.sample_vae_tiling``) runs there under :class:`~adm_megatron.memory.fake_peak.FakePeak`.
At CogVideoX's full size (13 x 60 x 90 latents) the count takes about a second, about seven with
tiling.

The count is of tensor storages; on a CPU the convolutions' own workspaces (an im2col buffer per
call, oneDNN's reorders) come on top and are not counted, and on a GPU cuDNN's are left to the
plan's margin (``tools/gpu_check.py`` compares the count with the CUDA allocator's peak).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from adm_megatron.memory.fake_peak import FakePeak


@dataclass(frozen=True)
class SampleDecode:
    vae_bytes: int  # the VAE's weights, on the device while the samples are decoded
    decode_peak: int  # bytes one sample's decode and postprocess add at their peak


def vae_config_dir(config) -> str | None:
    """The directory of the pipeline's VAE config (``model.pipeline``, else ``model.teacher``), None
    when there is none (a plan from a preset, or a teacher without a pipeline: no samples)."""
    vae_dir = os.path.join(config.model.pipeline or config.model.teacher, "vae")
    return vae_dir if os.path.isfile(os.path.join(vae_dir, "config.json")) else None


def count_sample_decode(config, family, latent_shape: tuple[int, ...], vae_dir: str) -> SampleDecode:
    """The figures above for one sample of ``latent_shape`` (no batch dimension)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adm_megatron.train.samples import decoded_pixels, sample_vae, sample_vae_dtype

    vae_class = family.vae_type()
    dtype = sample_vae_dtype(config)
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the run's dtype: a fake module cannot be cast
        try:
            vae = sample_vae(vae_class.from_config(vae_class.load_config(vae_dir)), config)
        finally:
            torch.set_default_dtype(default)
        latents = torch.randn(1, *latent_shape, dtype=dtype)
        with torch.no_grad(), FakePeak() as decode:
            decoded_pixels(family, vae, latents)
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    return SampleDecode(vae_bytes=weights, decode_peak=decode.peak)
