"""SD3 through the whole product, on the model-family interface (``families/sd3.py``): the teacher's
CFG flow-matching ODE equals ``StableDiffusion3Pipeline``'s own sampling; an ADM run of the tiny
pipeline (``examples/sd35/tiny_cpu.yaml``) trains with 2D heads on every block and pooled prompts,
exports a generator diffusers loads, and renders PNGs and a grid through the real pipeline; a LoRA
generator's file loads with ``StableDiffusion3Pipeline.load_lora_weights``; the converter round
trips an SD3 transformer bit for bit; ADP (with its pixel branch on the pipeline's VAE) and DMD2 train
on SD3 teacher ODE pairs with pooled prompts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adm_megatron.config import ConfigError, LoraConfig, load_config
from adm_megatron.lora.export import LORA_WEIGHTS
from tiny_cogvideox import rel_err
from tool_scripts import load_tool
from adm_megatron.data.tiny_pixel_encoders import save_tiny_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat", "blue sky over the sea", "a dog", "green tree at night"]


@pytest.fixture(scope="module")
def prompt_dir(sd3_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3_prompts")
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "precompute_text_embeddings.py"), "--prompts",
           str(out / "prompts.txt"), "--encoder", sd3_pipeline, "--out", str(out / "emb"), "--max-length", "16",
           "--dtype", "float32", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out / "emb")


def test_teacher_ode_equals_the_sd3_pipelines_sampling(sd3_pipeline, prompt_dir, world_of_one):
    from diffusers import StableDiffusion3Pipeline

    from adm_megatron.algorithms.networks import DiTFunction, text_condition
    from adm_megatron.data import TextEmbeddingShards
    from adm_megatron.ode_collection import sample_pairs
    from adm_megatron.train.teacher import resolve_teacher

    source = resolve_teacher(sd3_pipeline)
    assert source.family.name == "sd3"
    teacher = source.build_models(1)[0].eval()
    prompts = TextEmbeddingShards(prompt_dir)
    ids = torch.tensor([0, 2])
    text, pooled = prompts.get(ids), prompts.get_pooled(ids)
    negative = prompts.negative().expand_as(text)
    negative_pooled = prompts.negative_pooled().expand_as(pooled)
    x_T = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = sample_pairs(DiTFunction(teacher, None), source.schedule(), x_T, text_condition(text, pooled),
                            text_condition(negative, negative_pooled), torch.full((2,), 5.0), 4)
        pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
        reference = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                         negative_pooled_prompt_embeds=negative_pooled, latents=x_T, height=32, width=32,
                         num_inference_steps=4, guidance_scale=5.0, output_type="latent").images
    assert rel_err(ours, reference) <= 1e-5, rel_err(ours, reference)


def test_sd3_adm_run_trains_exports_and_renders(sd3_pipeline, prompt_dir, tmp_path, world_of_one):
    from diffusers import SD3Transformer2DModel

    from adm_megatron.families import get_family
    from adm_megatron.train.trainer import Trainer

    config = load_config(os.path.join(ROOT, "examples", "sd35", "tiny_cpu.yaml"), [
        f"model.teacher={sd3_pipeline}", f"data.path={prompt_dir}", f"output_dir={tmp_path / 'run'}",
        "train.max_iterations=3", "logging.wandb_mode=disabled", "logging.progress=false"])
    trainer = Trainer(config)
    assert trainer.family.name == "sd3" and trainer.heads is not None
    assert len(trainer.heads.heads) == trainer.arch.num_layers  # a 2D head on every block
    result = trainer.fit()
    metrics = result.last_metrics
    assert 0.0 <= metrics["discriminator/paired_accuracy"] <= 1.0 and metrics["generator/loss"] == metrics["generator/loss"]
    exported = SD3Transformer2DModel.from_pretrained(result.generator_dir)
    teacher = SD3Transformer2DModel.from_pretrained(sd3_pipeline, subfolder="transformer")
    moved = max((a - b).abs().max().item() for a, b in zip(exported.state_dict().values(), teacher.state_dict().values()))
    assert moved > 0  # the generator trained
    ours = get_family("sd3").build_model_from_hf(result.generator_dir)
    trained = {k: v for k, v in trainer.generator.state_dict().items() if not k.endswith("_extra_state")}
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in trained.items())
    names = sorted(os.path.basename(p) for p in result.samples)
    assert names == ["grid.png", "sample-000.png", "sample-001.png"]

    # adm-megatron sample renders the run's own samples again: the same prompts, seeds and T5 length (the
    # embeddings' 16 T5 tokens, from distillation.json; at the pipeline's 256 they differed by up to 14 / 255)
    from PIL import Image

    from adm_megatron.cli import main
    from adm_megatron.convert.distillation_record import read_distillation_record

    assert read_distillation_record(result.generator_dir)["text_length"] == 32  # 16 CLIP + 16 T5 tokens
    out = tmp_path / "sampled"
    assert main(["sample", "--pipeline", sd3_pipeline, "--generator", result.generator_dir, "--prompt", PROMPTS[0],
                 "--prompt", PROMPTS[1], "--seed", str(config.seed), "--teacher-steps", "0", "--out", str(out)]) == 0
    for i in range(2):
        ours = np.asarray(Image.open(out / "generator" / f"sample-00{i}.png"), dtype=int)
        runs = np.asarray(Image.open(tmp_path / "run" / "samples" / f"sample-00{i}.png"), dtype=int)
        assert np.abs(ours - runs).max() <= 1, i
    # and so does the README.md beside the generator, in diffusers alone (T5's max_sequence_length=16 included)
    from model_card_run import render_card

    first = np.asarray(Image.open(out / "generator" / "sample-000.png"), dtype=int)
    assert np.array_equal(render_card(result.generator_dir, PROMPTS[0], config.seed, tmp_path), first)
    # and the whole pipeline export --pipeline-out writes (its image encoder and feature extractor are
    # optional components the teacher pipeline lists as null: they load as None, not refused)
    whole = tmp_path / "whole"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "gen"),
                 "--pipeline-out", str(whole)]) == 0
    assert np.array_equal(render_card(str(whole), PROMPTS[0], config.seed, tmp_path), first)


def test_sd3_lora_adm_run_exports_a_file_equal_to_its_merged_export(sd3_pipeline, prompt_dir, tmp_path, world_of_one):
    """The LoRA generator of a tiny SD3 ADM run: its file, loaded through the real pipeline's
    ``load_lora_weights``, gives the merged export's output, and the run renders through it."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from adm_megatron.train.trainer import Trainer

    config = load_config(os.path.join(ROOT, "examples", "sd35", "tiny_cpu.yaml"), [
        f"model.teacher={sd3_pipeline}", f"data.path={prompt_dir}", f"output_dir={tmp_path / 'run'}",
        "train.max_iterations=3", "train.export_lora=both", "logging.wandb_mode=disabled", "logging.progress=false",
        "model.lora.rank=4", "model.lora.alpha=8", "optim.generator.lr=1e-2"])
    result = Trainer(config).fit()
    merged = SD3Transformer2DModel.from_pretrained(result.generator_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    pooled, t = torch.randn(2, 64, generator=g), torch.tensor([100.0, 700.0])

    def call(m):
        with torch.no_grad():
            return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

    teacher_out = call(pipe.transformer)
    pipe.load_lora_weights(os.path.join(tmp_path, "run", "generator_lora"), weight_name=LORA_WEIGHTS)
    assert rel_err(call(merged), teacher_out) > 1e-4  # the adapters trained
    assert rel_err(call(pipe.transformer), call(merged)) <= 1e-5
    assert sorted(os.path.basename(p) for p in result.samples) == ["grid.png", "sample-000.png", "sample-001.png"]
    # the README.md beside the LoRA file (load_lora_weights on the teacher) renders the merged one's image
    from model_card_run import card_code, render_card

    assert "pipe.load_lora_weights(generator_dir)" in card_code(os.path.join(tmp_path, "run", "generator_lora"))
    images = [render_card(os.path.join(tmp_path, "run", name), PROMPTS[0], 0, tmp_path)
              for name in ("generator", "generator_lora")]
    assert np.abs(images[0] - images[1]).max() <= 1


def test_sd3_lora_file_loads_in_the_sd3_pipeline(sd3_pipeline, tmp_path, world_of_one):
    from diffusers import StableDiffusion3Pipeline

    from adm_megatron.families import get_family
    from adm_megatron.lora import apply_lora
    from adm_megatron.lora.export import export_lora_file, export_merged

    family = get_family("sd3")
    model = family.build_model_from_hf(os.path.join(sd3_pipeline, "transformer"))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2"]
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=12.0, target_modules=targets), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 16, 8, 8, generator=g)
    text, pooled, t = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g), torch.tensor([100.0, 700.0])

    def call(m):
        with torch.no_grad():
            return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

    ours = call(model)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    assert rel_err(ours, call(pipe.transformer)) > 1e-2  # the adapters matter
    lora_dir = export_lora_file(model, str(tmp_path / "lora"))
    keys = load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS)
    assert rel_err(call(pipe.transformer), ours) <= 1e-5
    merged = family.diffusers_model_class().from_pretrained(export_merged(model, model.arch, str(tmp_path / "merged")))
    assert rel_err(call(merged), ours) <= 1e-5


def test_converter_round_trips_an_sd3_transformer(sd3_pipeline, tmp_path, world_of_one):
    tool = load_tool("convert_checkpoint")  # its main in this process (a subprocess each took ~6 s)
    hf = os.path.join(sd3_pipeline, "transformer")
    for args in (["hf-to-megatron", "--model", "sd3", "--hf-path", hf, "--out", str(tmp_path / "meg")],
                 ["megatron-to-hf", "--model", "sd3", "--ckpt", str(tmp_path / "meg"), "--out", str(tmp_path / "hf")]):
        assert tool.main(args) == 0
    before = load_file(os.path.join(hf, "diffusion_pytorch_model.safetensors"))
    after = load_file(os.path.join(tmp_path, "hf", "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sd3_configs_in_examples_load_and_name_their_family():
    for name in ("sd35_large_4step.yaml", "sd3_medium_4step_lora.yaml", "tiny_cpu.yaml"):
        config = load_config(os.path.join(ROOT, "examples", "sd35", name), [])
        assert config.distill.head_every == 1 and config.data.frames == 1, name


@pytest.fixture(scope="module")
def sd3_pairs(sd3_pipeline, prompt_dir, tmp_path_factory):
    """Teacher ODE pairs of the tiny SD3 pipeline (pooled prompts), from ``adm-megatron collect-ode``."""
    out = tmp_path_factory.mktemp("sd3_pairs") / "pairs"
    cmd = [sys.executable, "-m", "adm_megatron.cli", "collect-ode", "--config",
           os.path.join(ROOT, "examples", "sd35", "tiny_cpu.yaml"), "--out", str(out), "--num-pairs", "8",
           "--steps", "4", "--no-progress", f"model.teacher={sd3_pipeline}", f"data.path={prompt_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="module")
def sam_encoder(tmp_path_factory):
    return save_tiny_encoder("sam", str(tmp_path_factory.mktemp("sam") / "sam"))


def _pairs_config(sd3_pipeline, prompt_dir, sd3_pairs, out, *overrides):
    return load_config(os.path.join(ROOT, "examples", "sd35", "tiny_cpu.yaml"), [
        f"model.teacher={sd3_pipeline}", f"data.path={prompt_dir}", f"data.real_path={sd3_pairs}",
        f"output_dir={out}", "train.max_iterations=2", "train.export=false", "logging.wandb_mode=disabled",
        "logging.progress=false", *overrides])


@pytest.mark.parametrize("method", ["adp", "dmd2"])
def test_sd3_methods_reading_teacher_pairs_train(method, sd3_pipeline, prompt_dir, sd3_pairs, sam_encoder, tmp_path,
                                                 world_of_one):
    """ADP (with its default pixel branch: the pipeline's ``AutoencoderKL`` decode and a SAM encoder)
    and DMD2 on SD3 read the pairs with their pooled prompts and update the generator; ADP's pixel
    branch sees one decoded 32 x 32 image per sample and its heads train."""
    from adm_megatron.train.trainer import Trainer

    pixel = [f"distill.pixel_encoder_path={sam_encoder}", "distill.pixel_layers=[2,4]"] if method == "adp" else []
    trainer = Trainer(_pairs_config(sd3_pipeline, prompt_dir, sd3_pairs, tmp_path / "run", f"distill.method={method}",
                                    *pixel))
    assert trainer.batches(0)[0].real.pooled.shape == (2, 64)
    before = [p.detach().clone() for p in trainer.generator.parameters()]
    if method == "adp":
        assert trainer.config.distill.pixel_weight == 0.15  # the default: the branch is on
        assert trainer.pixel.decode(trainer.batches(0)[0].real.x0).shape == (2, 3, 32, 32)
        pixel_heads = [p.detach().clone() for p in trainer.heads.pixel.parameters()]
    metrics = trainer.fit().last_metrics
    assert metrics["generator/skipped"] is False
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))
    if method == "adp":
        assert {"generator/pixel", "discriminator/pixel", "discriminator/pixel_d_real"} <= set(metrics)
        assert any(not torch.equal(a, b) for a, b in zip(pixel_heads, trainer.heads.pixel.parameters()))


def test_sd3_pixel_branch_refuses_a_vae_of_another_class(sd3_pipeline, prompt_dir, sd3_pairs, sam_encoder,
                                                         tmp_path):
    """A pipeline whose ``vae/`` is not the family's VAE class: one line, before any model is built."""
    from adm_megatron.train.trainer import Trainer

    pipe = tmp_path / "pipe"
    shutil.copytree(sd3_pipeline, pipe)
    vae_config = pipe / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "_class_name": "AutoencoderKLCogVideoX"}))
    config = _pairs_config(str(pipe), prompt_dir, sd3_pairs, tmp_path / "run", "distill.method=adp",
                           f"distill.pixel_encoder_path={sam_encoder}", "distill.pixel_layers=[2]")
    with pytest.raises(ConfigError, match=r"vae/config.json: a 'AutoencoderKLCogVideoX' VAE; the sd3 pixel "
                                          r"discriminator decodes with 'AutoencoderKL'$") as err:
        Trainer(config)
    assert "\n" not in str(err.value)
