"""ADP's pixel branch in the memory plan, counted rather than modelled: the pipeline's VAE (as the
model family's VAE class) and the vision encoder are built from their ``config.json`` files on fake
tensors, and what the run computes with them is run there under :class:`~adm_megatron.memory.fake_peak.FakePeak`
at the run's micro-batch and latent size (``heads/pixel.py`` and ``algorithms/adp.py`` are the code
that runs, so decode, resize, encoder and heads are what training does, with
``distill.pixel_recompute`` as configured):

- generator phase: the features of x̂0 with grad to it, the (frozen) pixel heads, and the backward
  to x̂0 -- the peak above the phase's other memory;
- the fake side's features, kept for the discriminator phase (per micro-batch);
- discriminator phase: the features of the real x_0 without grad, the pixel heads (training) on
  them and on the kept fake ones, and their backward;
- the frozen VAE and encoder weights, and the pixel heads' parameters (part of the discriminator).

With ``model.dtype=bf16`` the computation runs under BF16 autocast on the device type the run uses
where this machine has it, else under the CPU's autocast (its op lists are close to CUDA's: convs
and matmuls in bf16, norms in fp32), so a plan made without a GPU is an approximation there. Each
count takes about a second at real sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from adm_megatron.memory.fake_peak import FakePeak


@dataclass(frozen=True)
class PixelBranch:
    backbone_bytes: int  # the frozen VAE and vision encoder (held in fp32, as the run builds them)
    heads_params: int  # the pixel 2D heads' parameter elements (trained with the discriminator)
    heads_largest_param: int
    generator_peak: int  # bytes the generator phase's pixel work adds at its peak
    held_features: int  # the fake side's encoder features kept for the discriminator phase
    discriminator_peak: int  # bytes the discriminator phase's pixel work adds at its peak


def no_init_weights():
    """transformers' switch that skips weight initialisation (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights as switch
    except ImportError:
        from transformers.modeling_utils import no_init_weights as switch
    return switch()


def _files(config) -> tuple[str, str]:
    """The VAE's config (in the pipeline directory: ``model.pipeline``, else ``model.teacher``) and
    the encoder's, or a one-line ValueError naming what is missing."""
    pipeline = config.model.pipeline or config.model.teacher
    vae = os.path.join(pipeline, "vae", "config.json")
    encoder = os.path.join(config.distill.pixel_encoder_path, "config.json")
    for what, path in (("the pipeline's VAE", vae), ("distill.pixel_encoder_path's", encoder)):
        if not os.path.isfile(path):
            raise ValueError(f"distill.pixel_weight={config.distill.pixel_weight}: the pixel branch is planned from "
                             f"{what} config, {path}, which is not there")
    return vae, encoder


def pixel_branch(config, family, latent_shape: tuple[int, ...]) -> PixelBranch:
    """The figures above for ``config``'s ADP run (``latent_shape``: one sample's latents)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adm_megatron.heads import MultiHeadDiscriminator
    from adm_megatron.heads.pixel import PixelFeatures, encoder_class

    d = config.distill
    vae_file, encoder_file = _files(config)
    vae_class = family.vae_type()
    encoder_type = encoder_class(d.pixel_encoder)
    bf16 = config.model.dtype == "bf16"
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    batch = config.data.batch_size
    with FakeTensorMode(), torch.device(device_type):
        vae = vae_class.from_config(vae_class.load_config(os.path.dirname(vae_file)))
        with no_init_weights():  # initialisers that read values (DINOv2's) cannot run on fake tensors
            encoder = encoder_type(encoder_type.config_class.from_pretrained(os.path.dirname(encoder_file)))
        pixel = PixelFeatures(vae, family.decode_images, encoder, d.pixel_encoder, d.pixel_layers,
                              recompute=d.pixel_recompute)
        heads = MultiHeadDiscriminator(num_heads=len(d.pixel_layers), in_channels=pixel.channels, kind="2d",
                                       hidden_channels=d.head_hidden, num_blocks=d.head_blocks)

        def autocast():
            return torch.autocast(device_type, torch.bfloat16, enabled=bf16)

        heads.requires_grad_(False)  # frozen in the generator phase
        fake = torch.randn(batch, *latent_shape, requires_grad=True)
        with FakePeak() as generator, autocast():
            features = pixel.features(fake)
            heads(features).float().mean().backward()
        held = {f.untyped_storage()._cdata: f.untyped_storage().nbytes() for f in features}
        kept = [f.detach() for f in features]
        del features
        heads.requires_grad_(True)
        real = torch.randn(batch, *latent_shape)
        with FakePeak() as discriminator, autocast():
            with torch.no_grad():
                real_features = pixel.features(real)
            (heads(real_features).float().mean() + heads(kept).float().mean()).backward()
        backbone = sum(p.numel() * p.element_size() for p in (*vae.parameters(), *encoder.parameters()))
        head_params = [p.numel() for p in heads.parameters()]
    return PixelBranch(backbone_bytes=backbone, heads_params=sum(head_params),
                       heads_largest_param=max(head_params), generator_peak=generator.peak,
                       held_features=sum(held.values()), discriminator_peak=discriminator.peak)
