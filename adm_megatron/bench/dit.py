"""Our megatron backbone beside its family's diffusers transformer with the same weights, dtype and
inputs: the forward and forward + backward closures the benchmark times. Both are called the way
the trainer calls a backbone (``DiTFunction``: the family's positional inputs, the pooled text
embedding where the family takes one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adm_megatron.algorithms.networks import DiTFunction, text_condition
from adm_megatron.config import ModelConfig
from adm_megatron.families import family_of_arch
from adm_megatron.models.kernel_options import apply_kernel_options
from adm_megatron.models.weights import load_full_state_dict


@dataclass
class LatentShape:
    batch: int
    frames: int  # latent frames (1 for image families)
    height: int  # latent height
    width: int

    @classmethod
    def native(cls, arch, batch: int) -> "LatentShape":
        """The latent size the model was trained at (the family's ``native_latent_size``)."""
        return cls(batch, *family_of_arch(arch).native_latent_size(arch))


@dataclass
class DiTPair:
    ours: torch.nn.Module
    reference: torch.nn.Module  # diffusers
    inputs: tuple  # latents, timestep, text condition (the embedding, or it with the pooled one)
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    weight: torch.Tensor  # the random projection the backward reduces the output with

    def output(self, which: str) -> torch.Tensor:
        module = self.ours if which == "ours" else self.reference
        return DiTFunction(module, self.rotary)(*self.inputs)

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
    """Our model (``model.impl`` and its kernel options: attention backend, FP8, compilation) with
    ``reference``'s (the family's diffusers transformer) weights, both in ``dtype`` on ``device``, and
    random inputs of ``shape`` with the family's text length."""
    family = family_of_arch(arch)
    ours = family.build_model(arch, params_dtype=dtype, impl=model.impl, device=device)
    apply_kernel_options(ours, model)
    load_full_state_dict(ours, family.hf_to_megatron(reference.state_dict(), arch),
                         source="the diffusers reference")
    cond = family.conditioning(arch)
    reference = reference.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    latent = (shape.batch, *family.latent_shape(arch, shape.frames, shape.height, shape.width))
    latents = torch.randn(latent, generator=g)
    text = torch.randn(shape.batch, cond.text_length, cond.text_width, generator=g)
    pooled = None if cond.pooled_width is None else torch.randn(shape.batch, cond.pooled_width, generator=g)
    timestep = torch.randint(0, 1000, (shape.batch,), generator=g)
    weight = torch.randn(*latent[:-3], arch.out_channels, *latent[-2:], generator=g)  # channels are dim -3
    to = dict(device=device, dtype=dtype)
    rotary = family.positional_inputs(arch, shape.frames, shape.height, shape.width, device=device)
    condition = text_condition(text.to(**to), None if pooled is None else pooled.to(**to))
    return DiTPair(ours, reference, (latents.to(**to), timestep.to(device), condition), rotary, weight.to(device))
