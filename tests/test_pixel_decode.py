"""ADP's pixel branch decodes latents as each family's own diffusers pipeline does
(``models/vae_decode.py`` through ``ModelFamily.decode_images``), compared with the real pipelines
on the tiny offline ones: CogVideoX against ``CogVideoXPipeline.decode_latents``, SD3 against the
images ``StableDiffusion3Pipeline`` returns for the latents it returns under the same seed. (SD3 ADP
with the pixel branch in the trainer, and the error for a VAE of another family's class:
tests/test_sd3_training.py.)"""

from __future__ import annotations

import os

import torch

from adm_megatron.families import get_family


def _vae(pipeline_dir, family):
    import diffusers

    return getattr(diffusers, family.vae_class).from_pretrained(os.path.join(pipeline_dir, "vae")).eval()


def test_cogvideox_decode_is_the_pipelines(cogvideox_pipeline):
    from diffusers import CogVideoXPipeline

    family = get_family("cogvideox")
    pipe = CogVideoXPipeline.from_pretrained(cogvideox_pipeline)
    latents = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # [B, F, C, H, W]
    with torch.no_grad():
        want = pipe.decode_latents(latents)  # [B, 3, F', h, w]
        got = family.decode_images(_vae(cogvideox_pipeline, family), latents)
    frames = want.shape[2]
    assert frames > 2 and got.shape == (2 * frames, 3, *want.shape[3:])
    for b in range(2):  # sample b's frames, in order
        assert torch.equal(got[b * frames:(b + 1) * frames], want[b].transpose(0, 1))


def test_sd3_decode_is_the_pipelines(sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    family = get_family("sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    embeds = torch.randn(2, 8, pipe.transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, pipe.transformer.config.pooled_projection_dim, generator=torch.Generator().manual_seed(2))

    def run(output_type):
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0, height=32, width=32,
                    num_inference_steps=2, output_type=output_type,
                    generator=torch.Generator().manual_seed(3)).images

    latents, images = run("latent"), run("pt")  # images: the pipeline's decode, postprocessed to [0, 1]
    assert latents.shape == (2, 16, 8, 8) and images.shape == (2, 3, 32, 32)
    with torch.no_grad():
        got = family.decode_images(_vae(sd3_pipeline, family), latents)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close((got / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-6)
    # the shift factor is part of SD3's decode: without it the images differ
    plain = _vae(sd3_pipeline, family).decode(latents / pipe.vae.config.scaling_factor).sample
    assert (plain - got).abs().max() > 1e-3

