"""ADP's pixel-space discriminator: the frozen VAE decoder and a frozen vision encoder from
``transformers`` as the backbone, trainable 2D heads on the encoder's layers.

* :class:`PixelFeatures` (frozen, no parameters of its own to train): latents in the family's
  layout -> the pipeline's VAE decode as the family's pipeline does it (``decode_images`` of the
  model family: CogVideoX ``[B, F, C, H, W]`` -> every frame, SD3 ``[B, C, H, W]`` -> one image;
  ``models/vae_decode.py``) -> images in [-1, 1], ``[N, 3, h, w]``
  -> resized to the encoder's ``image_size`` and normalised with the encoder's ImageNet mean / std
  -> the encoder's hidden states at ``layers`` (1-based: layer k is the output of the k-th block),
  each as a map ``[B F', C, h', w']``.
* encoders: ``sam`` -- SAM's ViT image encoder (``SamVisionModel``; its hidden states are already
  ``[N, h', w', C]``), the paper's default; ``dinov2`` -- ``Dinov2Model``, the paper's ablation (the
  CLS token dropped, the patch tokens laid out on their grid). Loaded from a local directory with
  ``from_pretrained`` (a full ``SamModel`` checkpoint such as sam-vit-base works too: its
  ``vision_config`` and ``vision_encoder.*`` weights are what ``SamVisionModel`` reads); no hub.
* :class:`LatentPixelHeads`: the one trainable discriminator module of an ADP run -- the latent
  discriminator's 3D heads and (when the pixel branch exists) the pixel 2D heads, so one optimizer,
  one DDP wrapper and one checkpoint entry hold both; ``forward(features, branch)`` picks the set.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adm_megatron.heads.multi_head import MultiHeadDiscriminator

# the normalisation both encoders were trained with (SamImageProcessor / BitImageProcessor defaults)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_class(kind: str):
    from transformers import Dinov2Model, SamVisionModel

    return {"sam": SamVisionModel, "dinov2": Dinov2Model}[kind]


def load_pixel_encoder(kind: str, path: str) -> nn.Module:
    """The frozen vision encoder ``kind`` from the local directory ``path`` (eval mode, no grad)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"distill.pixel_encoder_path={path!r}: no config.json (expected a local "
                         f"transformers {encoder_class(kind).__name__} / checkpoint directory)")
    encoder = encoder_class(kind).from_pretrained(path, local_files_only=True)
    return encoder.eval().requires_grad_(False)


def recompute_vae(vae: nn.Module) -> None:
    """Activation checkpointing of a diffusers VAE's blocks (its own switch, non-reentrant
    ``torch.utils.checkpoint``; the decoder checkpoints whenever grad is enabled)."""
    vae.enable_gradient_checkpointing()


def recompute_encoder(encoder: nn.Module) -> None:
    """Activation checkpointing of a transformers encoder's layers (its own switch, non-reentrant). It
    checkpoints only in training mode (transformers 5 asks it of each layer, 4.x of the encoder that
    loops over them), so the modules the switch turned on alone are flagged as training: their
    dropouts and every other submodule stay in eval, and the outputs are unchanged."""
    if hasattr(encoder, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    switched = [m for m in encoder.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not switched:
        raise ValueError(f"distill.pixel_recompute: {type(encoder).__name__} has no checkpointable layers")
    for module in switched:
        module.training = True


class PixelFeatures(nn.Module):
    """Frozen: latents -> decoded frames -> the vision encoder's feature maps at ``layers``."""

    def __init__(self, vae: nn.Module, decode_images: Callable, encoder: nn.Module, kind: str, layers: list[int],
                 recompute: bool = False):
        super().__init__()
        count = encoder.config.num_hidden_layers
        bad = [k for k in layers if not 1 <= k <= count]
        if not layers or bad:
            raise ValueError(f"distill.pixel_layers={list(layers)}: the {kind} encoder has {count} layers; "
                             f"expected a non-empty list of layers in 1..{count}")
        self.vae = vae.eval().requires_grad_(False)
        self.decode_images = decode_images
        self.encoder = encoder.eval().requires_grad_(False)
        self.kind = kind
        self.layers = list(layers)
        self.image_size = encoder.config.image_size
        if recompute:
            recompute_vae(vae)
            recompute_encoder(encoder)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.encoder.config.hidden_size

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``[N, 3, h, w]`` images in about [-1, 1] (a sample's frames consecutive)."""
        return self.decode_images(self.vae, latents)

    def encode(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Frames in [-1, 1] -> the encoder's hidden states at ``layers``, each ``[N, C, h', w']``."""
        size = self.image_size
        x = F.interpolate((frames + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        hidden = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states
        return [self._as_map(hidden[k]) for k in self.layers]

    def _as_map(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "sam":  # [N, h', w', C]
            return h.permute(0, 3, 1, 2)
        grid = self.image_size // self.encoder.config.patch_size  # dinov2: [N, 1 + h' w', C]
        patches = h[:, 1:]
        return patches.transpose(1, 2).reshape(h.shape[0], h.shape[2], grid, grid)

    def features(self, latents: torch.Tensor) -> list[torch.Tensor]:
        return self.encode(self.decode(latents))


def build_pixel_features(family, kind: str, encoder_path: str, vae_dir: str, layers: list[int], device,
                         dtype, recompute: bool = False) -> PixelFeatures:
    """The frozen pixel backbone from local directories (the encoder's, the pipeline's ``vae/``, read
    as the model family's VAE class and decoded as its pipeline decodes)."""
    vae = family.load_vae(vae_dir)
    encoder = load_pixel_encoder(kind, encoder_path)
    return PixelFeatures(vae, family.decode_images, encoder, kind, layers, recompute).to(device, dtype)


class LatentPixelHeads(nn.Module):
    """ADP's trainable discriminator: latent 3D heads and, optionally, pixel 2D heads."""

    def __init__(self, latent: MultiHeadDiscriminator, pixel: MultiHeadDiscriminator | None):
        super().__init__()
        self.latent = latent
        self.pixel = pixel

    def forward(self, features: list[torch.Tensor], branch: str = "latent") -> torch.Tensor:
        heads = self.latent if branch == "latent" else self.pixel
        if heads is None:
            raise ValueError(f"LatentPixelHeads: no {branch!r} heads in this discriminator")
        return heads(features)
