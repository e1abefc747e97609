"""The tiny offline CogVideoX pipeline (build, reload, run) and ``render_samples`` (gif / mp4)."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from adm_megatron.data import build_tiny_pipeline
from adm_megatron.data.tiny_pipeline import MAX_TEXT_LENGTH, tiny_t5_tokenizer
from adm_megatron.models.cogvideox_samples import VideoShape, render_samples, video_shape


def _read(path: str) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, index=None)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    start = time.perf_counter()
    path = build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"), seed=0)
    assert time.perf_counter() - start < 10
    return path


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, MAX_TEXT_LENGTH, 32, generator=g), torch.randn(MAX_TEXT_LENGTH, 32, generator=g)


def test_tiny_pipeline_reloads_and_runs(pipe_dir):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, CogVideoXDDIMScheduler) and isinstance(pipe.vae, AutoencoderKLCogVideoX)
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.snr_shift_scale, cfg.rescale_betas_zero_snr) == (
        "v_prediction", "trailing", 3.0, True)
    assert pipe.transformer.config.max_text_seq_length == pipe.tokenizer.model_max_length == MAX_TEXT_LENGTH
    assert pipe.text_encoder.config.d_model == pipe.transformer.config.text_embed_dim
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (4, 4)
    text = ["a cat walking", "Red car, at night!"]
    ids = pipe.tokenizer(text, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids == tiny_t5_tokenizer()(text, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids[0][:4] == pipe.tokenizer.convert_tokens_to_ids(["▁a", "▁cat", "▁walking", "</s>"])
    assert pipe.tokenizer.unk_token_id not in ids[1] and ids[0][-1] == pipe.tokenizer.pad_token_id == 0
    frames = pipe(prompt=text[:1], num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 32, 32, 3) and np.isfinite(frames).all()
    with torch.no_grad():  # the VAE alone: 9 frames <-> 3 x 8 x 8 latents
        latents = pipe.vae.encode(torch.randn(1, 3, 9, 32, 32)).latent_dist.mode()
        assert latents.shape == (1, 4, 3, 8, 8)
        assert pipe.vae.decode(latents).sample.shape == (1, 3, 9, 32, 32)


def test_rope_variant(tmp_path):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(build_tiny_pipeline(str(tmp_path / "rope"), seed=1, rope=True))
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert cfg.use_rotary_positional_embeddings and cfg.attention_head_dim == 16
    frames = pipe(prompt="a dog", num_inference_steps=1, max_sequence_length=16, output_type="np").frames
    assert frames.shape == (1, 9, 32, 32, 3)
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_pipeline(str(tmp_path / "rope"))


def test_video_shape(pipe_dir):
    assert video_shape(pipe_dir) == VideoShape(frames=9, height=32, width=32, latent_channels=4,
                                               latent_frames=3, latent_height=8, latent_width=8)


def test_render_samples_gif_and_mp4(pipe_dir, embeds, tmp_path):
    prompt_embeds, negative = embeds
    transformer = os.path.join(pipe_dir, "transformer")
    gifs = render_samples(pipe_dir, transformer, prompt_embeds, negative, 2, str(tmp_path / "a"), fmt="gif", seed=5)
    assert [os.path.basename(p) for p in gifs] == ["sample-000.gif", "sample-001.gif"]
    videos = [_read(p) for p in gifs]
    assert all(v.shape == (9, 32, 32, 3) and v.dtype == np.uint8 for v in videos)
    assert not np.array_equal(videos[0], videos[1])
    again = render_samples(pipe_dir, None, prompt_embeds[1:], None, 2, str(tmp_path / "b"), seed=6)
    assert np.array_equal(_read(again[0]), videos[1])  # sample i: noise seed + i, independent of the batch
    other = render_samples(pipe_dir, None, prompt_embeds[1:], None, 2, str(tmp_path / "c"), seed=7)
    assert not np.array_equal(_read(other[0]), videos[1])
    mp4 = render_samples(pipe_dir, transformer, prompt_embeds[:1], negative, 2, str(tmp_path / "d"), fmt="mp4",
                         guidance_scale=6.0, fps=4)
    assert mp4[0].endswith("sample-000.mp4") and _read(mp4[0]).shape == (9, 32, 32, 3)


def test_render_samples_errors(pipe_dir, embeds, tmp_path):
    prompt_embeds, negative = embeds
    with pytest.raises(ValueError, match="fmt must be one of"):
        render_samples(pipe_dir, None, prompt_embeds, negative, 1, str(tmp_path), fmt="avi")
    with pytest.raises(ValueError, match="needs negative_embeds"):
        render_samples(pipe_dir, None, prompt_embeds, None, 1, str(tmp_path), guidance_scale=5.0)
    with pytest.raises(ValueError, match="does not match"):
        render_samples(pipe_dir, None, prompt_embeds, negative[:4], 1, str(tmp_path), guidance_scale=5.0)
    with pytest.raises(ValueError, match="width 8 != the transformer's text_embed_dim 32"):
        render_samples(pipe_dir, None, prompt_embeds[..., :8], None, 1, str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"broken/vae/config\.json: not found \(pipeline component 'vae'\)"):
        render_samples(str(broken), None, prompt_embeds, negative, 1, str(tmp_path))
    shutil.copytree(os.path.join(pipe_dir, "vae"), broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"nowhere/config\.json: not found \(transformer\)"):
        render_samples(str(broken), str(tmp_path / "nowhere"), prompt_embeds, negative, 1, str(tmp_path))
    config_file = broken / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "timestep_spacing": "leading"}))
    with pytest.raises(ValueError, match=r"scheduler_config\.json: .*timestep_spacing='leading'"):
        render_samples(str(broken), None, prompt_embeds, negative, 1, str(tmp_path))
