"""Image samples through the real ``StableDiffusion3Pipeline``: rendering from precomputed
embeddings (with the pooled part, without the text encoders loaded) gives exactly the images the
pipeline makes from the prompts themselves, with and without CFG; a swapped-in transformer is the
one sampled; a part of the prompts renders as the same samples of the whole (``first``); the PNG
grid tiles every sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adm_megatron.models.frame_files import image_grid, write_grid
from adm_megatron.models.sd3_samples import render_image_samples

PROMPTS = ["a red cat", "blue sky over the sea", "a dog"]


def _read(path: str) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path)


def _embeddings(pipeline_dir: str):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir)
    with torch.no_grad():  # one prompt at a time, as the pipeline below (batching changes the last bits)
        parts = [pipe.encode_prompt(p, None, None, do_classifier_free_guidance=True, negative_prompt="",
                                    max_sequence_length=16) for p in PROMPTS]
    embeds, negative, pooled, negative_pooled = (torch.cat(t) for t in zip(*parts))
    return pipe, embeds, negative[0], pooled, negative_pooled[0]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_rendered_images_equal_the_pipeline_run_from_prompts(sd3_pipeline, tmp_path, guidance):
    pipe, embeds, negative, pooled, negative_pooled = _embeddings(sd3_pipeline)
    seconds: list[float] = []
    paths = render_image_samples(sd3_pipeline, None, embeds, pooled, 2, str(tmp_path / "out"),
                                 negative_embeds=negative, negative_pooled=negative_pooled,
                                 guidance_scale=guidance, seed=5, height=32, width=32, seconds=seconds)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["sample-000.png", "sample-001.png", "sample-002.png"]
    assert len(seconds) == 3
    for i, prompt in enumerate(PROMPTS):
        want = pipe(prompt=prompt, negative_prompt="", num_inference_steps=2, guidance_scale=guidance, height=32, width=32,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(5 + i), output_type="np").images[0]
        assert np.array_equal(_read(paths[i]), (want * 255).round().clip(0, 255).astype(np.uint8)), prompt
    # the last two prompts alone, as samples 1 and 2 (a rank's share): the same files
    part = render_image_samples(sd3_pipeline, None, embeds[1:], pooled[1:], 2, str(tmp_path / "part"),
                                negative_embeds=negative, negative_pooled=negative_pooled,
                                guidance_scale=guidance, seed=5, height=32, width=32, first=1)
    assert [p.rsplit("/", 1)[1] for p in part] == ["sample-001.png", "sample-002.png"]
    assert all(np.array_equal(_read(a), _read(b)) for a, b in zip(part, paths[1:]))
    write_grid(paths, str(tmp_path / "grid.png"))
    grid = _read(str(tmp_path / "grid.png"))
    assert grid.shape == (64, 64, 3)  # 3 images of 32x32 on a 2x2 grid
    assert np.array_equal(grid[32:, :32], _read(paths[2])) and not grid[32:, 32:].any()


def test_a_swapped_transformer_is_the_one_sampled(sd3_pipeline, tmp_path):
    from diffusers import SD3Transformer2DModel

    _, embeds, _, pooled, _ = _embeddings(sd3_pipeline)
    other = SD3Transformer2DModel.from_pretrained(sd3_pipeline, subfolder="transformer")
    with torch.no_grad():
        other.proj_out.weight.mul_(-1)
    other.save_pretrained(tmp_path / "other")
    own = render_image_samples(sd3_pipeline, None, embeds[:1], pooled[:1], 2, str(tmp_path / "a"), height=32, width=32)
    swapped = render_image_samples(sd3_pipeline, str(tmp_path / "other"), embeds[:1], pooled[:1], 2,
                                   str(tmp_path / "b"), height=32, width=32)
    assert not np.array_equal(_read(own[0]), _read(swapped[0]))


def test_bad_inputs_are_named(sd3_pipeline, tmp_path):
    _, embeds, _, pooled, _ = _embeddings(sd3_pipeline)
    with pytest.raises(ValueError, match="guidance_scale > 1 needs negative_embeds"):
        render_image_samples(sd3_pipeline, None, embeds, pooled, 2, str(tmp_path), guidance_scale=3.0)
    with pytest.raises(ValueError, match="joint_attention_dim 32"):
        render_image_samples(sd3_pipeline, None, embeds[..., :16], pooled, 2, str(tmp_path))
    assert image_grid([np.ones((2, 2, 3))] * 2).shape == (2, 4, 3)
