"""ADP in the trainer, on the tiny CogVideoX pipeline (tiny VAE) with tiny SAM / DINOv2 encoders:

- no fake score: none is built, trained, logged or checkpointed;
- the pixel backbone: SAM and DINOv2 both work, the features are the encoder's hidden states at the
  configured layers (of the VAE-decoded frames), and a 2D head sits on each; a layer the encoder
  lacks is a one-line ConfigError before any model is built;
- λ2 = 0 does no pixel work at all (no VAE decode, no encoder forward; counted), λ2 > 0 does;
- the DMDX two-stage recipe end to end: stage 1 ADP (latent + SAM pixel discriminators), stage 2 ADM
  from its exported generator (``model.generator_init``), whose export loads in diffusers and renders
  through the real ``CogVideoXPipeline`` (2 iterations each; 40-50 s on the shared cores).
"""

from __future__ import annotations

import os

import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from adm_megatron.data.tiny_pixel_encoders import LAYERS, make_tiny_encoder, save_tiny_encoder

BASE = [
    "distill.method=adp", "data.num_prompts=4", "data.batch_size=2", "data.frames=2", "data.height=4",
    "data.width=4", "distill.head_every=1", "distill.head_hidden=16", "train.num_samples=0",
    "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false", "train.max_iterations=1",
    "distill.pixel_layers=[2,4]",
]


@pytest.fixture
def pipeline_dir(cogvideox_pipeline):
    return cogvideox_pipeline


@pytest.fixture
def pairs(cogvideox_ode_pairs):
    return cogvideox_ode_pairs


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {kind: save_tiny_encoder(kind, str(root / kind)) for kind in ("sam", "dinov2")}


def _config(pipeline_dir, pairs, out, *overrides):
    return load_config(None, [f"model.teacher={pipeline_dir}", f"data.real_path={pairs}", f"output_dir={out}",
                              *BASE, *overrides])


def _trainer(*args, **kwargs):
    from adm_megatron.train.trainer import Trainer

    return Trainer(_config(*args, **kwargs))


@pytest.mark.parametrize("kind", ["sam", "dinov2"])
def test_pixel_features_are_the_encoders_layers(kind, pipeline_dir, pairs, encoders, tmp_path, world_of_one):
    trainer = _trainer(pipeline_dir, pairs, tmp_path, f"distill.pixel_encoder={kind}",
                       f"distill.pixel_encoder_path={encoders[kind]}")
    pixel = trainer.pixel
    latents = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    frames = pixel.decode(latents)
    n = frames.shape[0]  # every decoded frame of both samples, each an image
    assert n % 2 == 0 and n > 4 and frames.shape[1:] == (3, 16, 16)  # 4 x 4 latents -> 16 x 16 pixels
    features = pixel.features(latents)
    # the same encoder weights, run by hand on the normalised 32 x 32 frames
    encoder = make_tiny_encoder(kind)
    x = torch.nn.functional.interpolate((frames + 1) / 2, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    hidden = encoder(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1 and len(features) == 2
    for got, k in zip(features, (2, 4)):
        want = hidden[k].permute(0, 3, 1, 2) if kind == "sam" else hidden[k][:, 1:].transpose(1, 2).reshape(n, 32, 4, 4)
        assert got.shape == (n, 32, 4, 4)
        assert torch.allclose(got, want, atol=1e-5), (kind, k)
    assert not torch.allclose(features[0], features[1])
    heads = trainer.heads.pixel
    assert heads.kind == "2d" and heads.num_heads == 2 and heads.in_channels == [32, 32]
    assert all(not p.requires_grad for p in pixel.parameters())  # the backbone is frozen ...
    trained = {id(p) for p in trainer.trainable["discriminator"].module.parameters()}
    assert {id(p) for p in heads.parameters()} <= trained  # ... its heads train with the latent ones
    assert not {id(p) for p in pixel.parameters()} & trained


def test_bad_pixel_layer_is_a_one_line_error(pipeline_dir, pairs, encoders, tmp_path):
    from adm_megatron.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"distill.pixel_layers=\[3, 6, 9, 12\]: .* has 4 layers") as err:
        Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"data.real_path={pairs}",
                                   f"output_dir={tmp_path}", *BASE[:-1], f"distill.pixel_encoder_path={encoders['sam']}"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="expects 'dinov2'"):
        Trainer(_config(pipeline_dir, pairs, tmp_path, "distill.pixel_encoder=dinov2",
                        f"distill.pixel_encoder_path={encoders['sam']}"))
    with pytest.raises(ConfigError) as err:  # a placeholder path: not taken for a hub repo id
        Trainer(_config(pipeline_dir, pairs, tmp_path, "distill.pixel_encoder_path=/models/sam-vit-base"))
    assert str(err.value) == ("distill.pixel_encoder_path='/models/sam-vit-base': directory not found (a local "
                              "transformers sam model directory)")


class _Counter:
    def __init__(self, monkeypatch, cls, name):
        self.calls = 0
        original = getattr(cls, name)

        def counted(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


@pytest.mark.parametrize("pixel_weight", [0.0, 0.15])
def test_zero_pixel_weight_does_no_pixel_work(pixel_weight, pipeline_dir, pairs, encoders, tmp_path, monkeypatch,
                                              world_of_one):
    from diffusers import AutoencoderKLCogVideoX
    from transformers import SamVisionModel

    decodes = _Counter(monkeypatch, AutoencoderKLCogVideoX, "decode")
    encodes = _Counter(monkeypatch, SamVisionModel, "forward")
    trainer = _trainer(pipeline_dir, pairs, tmp_path, f"distill.pixel_weight={pixel_weight}",
                       f"distill.pixel_encoder_path={encoders['sam']}")
    metrics = trainer.train_iteration(0)
    # no fake score: not built, not trained, no phase
    assert trainer.fake_score is None and trainer.networks.fake_score is None
    assert set(trainer.trainable) == {"generator", "discriminator"}
    assert not any(k.startswith("fake_score/") for k in metrics)
    assert "generator/loss" in metrics and "discriminator/loss" in metrics
    if pixel_weight == 0:
        assert (decodes.calls, encodes.calls) == (0, 0)
        assert trainer.pixel is None and trainer.heads.pixel is None
        assert "generator/pixel" not in metrics
    else:  # fake decoded + encoded once (generator phase, reused), real once (discriminator phase)
        assert (decodes.calls, encodes.calls) == (2, 2)
        assert "generator/pixel" in metrics and "discriminator/pixel" in metrics


def _two_stage(pipeline_dir, pairs, encoders, root):
    """Stage 1 ADP (latent + SAM pixel), then ADM 1-step from its generator, each rendering samples."""
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    common = ["distill.generator_steps=1", "train.export=true", "train.max_iterations=2"]
    stage1 = Trainer(_config(pipeline_dir, pairs, f"{root}/stage1", *common,
                             f"distill.pixel_encoder_path={encoders['sam']}", "train.num_samples=1")).fit()
    destroy_parallel()
    assert not os.path.isdir(f"{root}/stage1/checkpoints/iter_0000002/fake_score")
    generator = CogVideoXTransformer3DModel.from_pretrained(stage1.generator_dir)
    teacher = CogVideoXTransformer3DModel.from_pretrained(pipeline_dir, subfolder="transformer")
    moved = [n for n, p in generator.state_dict().items() if not torch.equal(p, teacher.state_dict()[n])]
    assert moved  # stage 1 trained the generator
    assert stage1.samples and all(os.path.getsize(p) > 0 for p in stage1.samples)
    stage2_result = Trainer(load_config(None, [
        f"model.teacher={pipeline_dir}", f"model.generator_init={stage1.generator_dir}", f"output_dir={root}/stage2",
        "distill.method=adm", "distill.delta_t=100", *BASE[1:], *common, "train.num_samples=1"])).fit()
    destroy_parallel()
    CogVideoXTransformer3DModel.from_pretrained(stage2_result.generator_dir)
    assert stage2_result.samples and all(os.path.getsize(p) > 0 for p in stage2_result.samples)
    return stage1, stage2_result


def test_dmdx_two_stage_run(pipeline_dir, pairs, encoders, tmp_path, world_of_one):
    _two_stage(pipeline_dir, pairs, encoders, str(tmp_path))


# the pixel branch each example runs: SD3's 1024 x 1024 image with recompute; none for CogVideoX,
# whose 49 decoded frames of 480 x 720 need more than a card (docs/PERFORMANCE.md, "ADP's pixel branch")
PIXEL_BRANCH = {"cogvideox": (1.0, 0.0, False), "sd35": (0.85, 0.15, True)}


@pytest.mark.parametrize("example", sorted(PIXEL_BRANCH))
def test_dmdx_example_configs_chain_the_stages_with_the_papers_rates(example):
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", example)
    stage1 = load_config(os.path.join(root, "dmdx_stage1_adp.yaml"))
    stage2 = load_config(os.path.join(root, "dmdx_stage2_adm.yaml"))
    assert (stage1.distill.method, stage2.distill.method) == ("adp", "adm")
    assert stage1.distill.generator_steps == stage2.distill.generator_steps == 1
    assert stage2.model.generator_init == os.path.join(stage1.output_dir, "generator")
    assert (stage1.optim.generator.lr, stage1.optim.discriminator.lr) == (1e-6, 5e-6)
    assert (stage2.optim.generator.lr, stage2.optim.fake_score.lr, stage2.optim.discriminator.lr) == (1e-7, 1e-6, 5e-6)
    d = stage1.distill
    assert (d.latent_weight, d.pixel_weight, d.pixel_recompute) == PIXEL_BRANCH[example]
    assert (d.pixel_encoder, d.pixel_layers) == ("sam", [3, 6, 9, 12])
    for key in ("guidance_scale", "head_every", "head_hidden"):
        assert getattr(stage1.distill, key) == getattr(stage2.distill, key), key
    assert stage1.model.teacher == stage2.model.teacher and stage1.data.path == stage2.data.path


def test_a_resume_refuses_a_pixel_encoder_replaced_since(pipeline_dir, pairs, encoders, tmp_path):
    """ADP's pixel encoder (``distill.pixel_encoder_path``) is frozen and read at every start: replaced
    between two starts (another checkpoint of the encoder in the same directory) it changed the pixel
    discriminator's features silently; the checkpoint's fingerprint refuses it in one line."""
    import shutil

    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    encoder = shutil.copytree(encoders["sam"], tmp_path / "sam")
    overrides = [f"distill.pixel_encoder_path={encoder}", "train.save_every=1"]
    try:
        assert Trainer(_config(pipeline_dir, pairs, tmp_path / "run", *overrides)).fit().trained == 1
        destroy_parallel()
        save_tiny_encoder("sam", str(encoder), seed=1)  # other weights, same files
        with pytest.raises(ConfigError) as err:
            Trainer(_config(pipeline_dir, pairs, tmp_path / "run", *overrides, "train.max_iterations=2"))
    finally:
        destroy_parallel()
    message = str(err.value)
    assert "\n" not in message and "the run was trained with the pixel encoder of fingerprint " in message
    assert f"distill.pixel_encoder_path={str(encoder)!r} now has " in message, message
