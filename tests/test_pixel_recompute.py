"""``distill.pixel_recompute``: ADP's pixel branch recomputed block by block in backward (the
diffusers VAE decoder's blocks, the transformers encoder's layers; ``heads/pixel.recompute_vae, recompute_encoder``).

- exact: the features and the gradient they send back to the latents are bit-equal with and
  without it (SAM and DINOv2, on the tiny CogVideoX pipeline's VAE);
- it saves memory where it claims to: the measured peak of a decode + backward and of an encode +
  backward (torch.profiler's allocator events, ``memory/measure.peak_during``) each drop below a
  bound (measured on this machine: decode 0.39x, SAM encode 0.55x, DINOv2 encode 0.47x);
- the trainer passes the option on, and it is refused away from ADP in one line.
"""

from __future__ import annotations

import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from adm_megatron.families import get_family
from adm_megatron.heads.pixel import build_pixel_features
from adm_megatron.memory.measure import peak_during
from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder

DECODE_BOUND = 0.6  # recomputed / plain peak
ENCODE_BOUND = 0.75


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Encoders wide enough that their activations, not their outputs, make the peak."""
    root = tmp_path_factory.mktemp("wide_encoders")
    return {kind: save_tiny_encoder(kind, str(root / kind), width=64, image_size=128) for kind in ("sam", "dinov2")}


def _pixel(pipeline_dir, encoder_dir, kind, recompute):
    return build_pixel_features(get_family("cogvideox"), kind, encoder_dir, f"{pipeline_dir}/vae", [2, 4], "cpu",
                                torch.float32, recompute=recompute)


def _square_sum(tensors) -> torch.Tensor:
    return sum(t.square().sum() for t in tensors)


@pytest.mark.parametrize("kind", ["sam", "dinov2"])
def test_recompute_is_exact_and_saves_memory(kind, cogvideox_pipeline, encoders):
    latents = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # 9 frames of 64 x 64
    runs = {}
    for recompute in (False, True):
        pixel = _pixel(cogvideox_pipeline, encoders[kind], kind, recompute)
        x = latents.clone().requires_grad_(True)
        features = pixel.features(x)
        grad = torch.autograd.grad(_square_sum(features), x)[0]
        frames = pixel.decode(latents).requires_grad_(True)
        peaks = (peak_during(lambda: pixel.decode(x).square().sum().backward()),
                 peak_during(lambda: _square_sum(pixel.encode(frames)).backward()))
        runs[recompute] = ([f.detach() for f in features], grad, peaks)
    (plain, plain_grad, plain_peaks), (recomputed, recomputed_grad, peaks) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert torch.equal(plain_grad, recomputed_grad) and plain_grad.abs().sum() > 0
    decode, encode = (p / q for p, q in zip(peaks, plain_peaks))
    assert decode < DECODE_BOUND, (peaks, plain_peaks)
    assert encode < ENCODE_BOUND, (peaks, plain_peaks)


def test_the_trainer_passes_pixel_recompute_on(cogvideox_pipeline, cogvideox_ode_pairs, encoders, tmp_path,
                                               world_of_one):
    from adm_megatron.train.trainer import Trainer

    def pixel(*overrides):
        return Trainer(load_config(None, [
            f"model.teacher={cogvideox_pipeline}", f"data.real_path={cogvideox_ode_pairs}", "distill.method=adp",
            "data.frames=2", "data.height=4", "data.width=4", "distill.head_every=1", "data.num_prompts=4",
            f"distill.pixel_encoder_path={encoders['sam']}", "distill.pixel_layers=[2,4]",
            f"output_dir={tmp_path / str(len(overrides))}", "logging.wandb_mode=disabled", *overrides])).pixel

    def checkpointing(p):
        return p.vae.decoder.gradient_checkpointing, p.encoder.vision_encoder.gradient_checkpointing

    assert checkpointing(pixel()) == (False, False)
    assert checkpointing(pixel("distill.pixel_recompute=true")) == (True, True)


def test_pixel_recompute_is_an_adp_option():
    with pytest.raises(ConfigError, match=r"distill.pixel_recompute=True is an ADP option \(distill.method=adp\), "
                                          r"got distill.method=adm$"):
        load_config(None, ["model.teacher=t", "distill.pixel_recompute=true"])
