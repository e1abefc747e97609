"""The size a diffusers pipeline renders at, as its call's pixel arguments (``height``, ``width`` and,
for video, ``num_frames``), and the latent size (frames, height, width) that is.

A generator renders well at the latent size it was distilled at; a pipeline's default is its
transformer's native size. ``adm-megatron sample`` therefore renders at the size the generator's
``distillation.json`` records unless told otherwise, and checks a requested size here, in one line,
before any weights load. Both families' pipelines map latents to pixels the same way:
``vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)`` pixels per latent row and column, and
for video ``num_frames = (latent_frames - 1) * vae.temporal_compression_ratio + 1``
(``CogVideoXPipeline.prepare_latents`` inverts it); a latent side must also be a whole number of the
transformer's patches, and no more of them than a cropped position embedding covers (SD3's
``pos_embed_max_size``; CogVideoX computes its positions for any size).
"""

from __future__ import annotations

from dataclasses import dataclass

from adm_megatron.models.pipeline_files import component_config

FLAGS = {"height": "--height", "width": "--width", "num_frames": "--num-frames"}


@dataclass(frozen=True)
class PipelineScale:
    spatial: int  # pixels per latent row / column
    temporal: int | None  # video frames per latent frame after the first; None: an image pipeline
    patch: int  # latent rows / columns per token
    max_patches: int | None = None  # the most tokens on a side (a cropped position embedding's size), None: any

    def pixels(self, frames: int, height: int, width: int) -> dict:
        """The pipeline call's size arguments for latents of ``frames`` x ``height`` x ``width``."""
        size = {"height": height * self.spatial, "width": width * self.spatial}
        if self.temporal is not None:
            size["num_frames"] = (frames - 1) * self.temporal + 1
        return size

    def latents(self, size: dict) -> tuple[int, int, int]:
        """(frames, height, width) of the latents a pipeline call of ``size`` denoises; one-line
        ValueError, naming the flag, for a size that is not exactly such a call."""
        if "num_frames" in size and self.temporal is None:
            raise ValueError(f"--num-frames {size['num_frames']}: this pipeline renders images")
        for key, value in size.items():
            if value < 1:
                raise ValueError(f"{FLAGS[key]} {value}: expected >= 1")
        side = self.spatial * self.patch
        for key in ("height", "width"):
            if size[key] % side:
                raise ValueError(f"{FLAGS[key]} {size[key]}: expected a multiple of {side} (the VAE's {self.spatial} "
                                 f"pixels per latent x the transformer's patch {self.patch})")
            if self.max_patches and size[key] // side > self.max_patches:
                raise ValueError(f"{FLAGS[key]} {size[key]}: expected at most {self.max_patches * side} (the "
                                 f"transformer's position embedding covers pos_embed_max_size={self.max_patches} "
                                 f"patches of {side} pixels on a side)")
        frames = 1
        if self.temporal is not None:
            if (size["num_frames"] - 1) % self.temporal:
                raise ValueError(f"--num-frames {size['num_frames']}: expected 1 + a multiple of {self.temporal} "
                                 "(the VAE's temporal compression)")
            frames = (size["num_frames"] - 1) // self.temporal + 1
        return frames, size["height"] // self.spatial, size["width"] // self.spatial


def pipeline_scale(pipeline_dir: str, transformer_config: dict, video: bool) -> PipelineScale:
    """The pixel / latent scale of the pipeline in ``pipeline_dir`` (its VAE's config) with a
    transformer of ``transformer_config``."""
    vae = component_config(pipeline_dir, "vae")
    return PipelineScale(spatial=2 ** (len(vae["block_out_channels"]) - 1),
                         temporal=vae["temporal_compression_ratio"] if video else None,
                         patch=transformer_config["patch_size"],
                         max_patches=transformer_config.get("pos_embed_max_size"))
