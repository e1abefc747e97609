"""Our megatron backbone beside its family's diffusers transformer with the same weights, dtype and
inputs: the forward and forward + backward closures the benchmark times. The latent size and the
output reduction are written for the video families the bench supports (``tools`` of the family
spec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adm_megatron.config import ModelConfig
from adm_megatron.families import family_of_arch
from adm_megatron.models.kernel_options import apply_kernel_options
from adm_megatron.models.weights import load_full_state_dict


@dataclass
class LatentShape:
    batch: int
    frames: int  # latent frames
    height: int  # latent height
    width: int

    @classmethod
    def real(cls, arch, batch: int) -> "LatentShape":
        """The latent size the model was trained at (CogVideoX: 49 frames of 480x720 -> 13x60x90)."""
        frames = (arch.sample_frames - 1) // arch.temporal_compression_ratio + 1
        return cls(batch, frames, arch.sample_height, arch.sample_width)


@dataclass
class DiTPair:
    ours: torch.nn.Module
    reference: torch.nn.Module  # diffusers
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # latents, text, timestep
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    weight: torch.Tensor  # the random projection the backward reduces the output with

    def output(self, which: str) -> torch.Tensor:
        latents, text, timestep = self.inputs
        if which == "ours":
            return self.ours(latents, text, timestep, image_rotary_emb=self.rotary).sample
        return self.reference(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                              image_rotary_emb=self.rotary).sample

    def forward(self, which: str) -> Callable[[], None]:
        def run():
            with torch.no_grad():
                self.output(which)
        return run

    def forward_backward(self, which: str) -> Callable[[], None]:
        module = self.ours if which == "ours" else self.reference

        def run():
            module.zero_grad(set_to_none=True)
            (self.output(which).float() * self.weight).sum().backward()
        return run

    def max_relative_difference(self) -> float:
        """max |ours - diffusers| / max |diffusers| of one forward (the two run the same model)."""
        with torch.no_grad():
            ours, ref = self.output("ours").float(), self.output("reference").float()
        return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def build_pair(reference: torch.nn.Module, arch, shape: LatentShape, dtype: torch.dtype,
               device: torch.device, model: ModelConfig, seed: int = 0) -> DiTPair:
    """Our model (``model.impl``, its attention backend and FP8 setting) with ``reference``'s (the
    family's diffusers transformer) weights, both in ``dtype`` on ``device``, and random inputs of
    ``shape`` with the model's full text length."""
    family = family_of_arch(arch)
    ours = family.build_model(arch, params_dtype=dtype, impl=model.impl, device=device)
    apply_kernel_options(ours, model)
    load_full_state_dict(ours, family.hf_to_megatron(reference.state_dict(), arch),
                         source="the diffusers reference")
    cond = family.conditioning(arch)
    reference = reference.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    b = shape.batch
    latents = torch.randn(b, shape.frames, arch.in_channels, shape.height, shape.width, generator=g)
    text = torch.randn(b, cond.text_length, cond.text_width, generator=g)
    timestep = torch.randint(0, 1000, (b,), generator=g)
    weight = torch.randn(b, shape.frames, arch.out_channels, shape.height, shape.width, generator=g)
    to = dict(device=device, dtype=dtype)
    rotary = family.positional_inputs(arch, shape.frames, shape.height, shape.width, device=device)
    return DiTPair(ours, reference, (latents.to(**to), text.to(**to), timestep.to(device)), rotary,
                   weight.to(device))
