"""The model-family registry: CogVideoX is resolved from what a user points the trainer and the
converter at, unknown classes are one-line errors, a pooled text embedding reaches the backbone,
and a family registered here -- a throw-away one reusing CogVideoX's model code under another
name and diffusers class -- is picked up by the teacher loader, the trainer and the converter with
no code change: a new family is one module plus one registry line."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import load_file

from adm_megatron.algorithms.base import PhaseBatch
from adm_megatron.algorithms.networks import DiTFunction, TextCondition
from adm_megatron.bench.adm_iteration import write_scheduler_pipeline
from adm_megatron.config import ConfigError, load_config
from adm_megatron.convert.checkpoint import (
    hf_to_megatron_checkpoint,
    megatron_to_hf_checkpoint,
    read_checkpoint_meta,
)
from adm_megatron.diffusion.guidance import cfg_model_output
from adm_megatron.families import (
    family_for_diffusers_class,
    family_names,
    get_family,
    register_family,
    unregister_family,
)
from adm_megatron.families.cogvideox import COGVIDEOX
from adm_megatron.models.cogvideox_config import CogVideoXArch
from adm_megatron.train.teacher import resolve_teacher
from tiny_cogvideox import make_diffusers_model, save_diffusers_model
from tool_scripts import load_tool

WEIGHTS = "diffusion_pytorch_model.safetensors"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# -- CogVideoX through the registry -----------------------------------------------------------


def test_registry_resolves_cogvideox_from_transformer_pipeline_and_checkpoint(tmp_path, world_of_one):
    assert get_family("cogvideox") is COGVIDEOX
    assert family_for_diffusers_class("CogVideoXTransformer3DModel") is COGVIDEOX
    transformer = save_diffusers_model("2b", str(tmp_path))
    pipeline = write_scheduler_pipeline(str(tmp_path / "pipeline"), COGVIDEOX)
    os.symlink(transformer, os.path.join(pipeline, "transformer"))

    from_dir = resolve_teacher(transformer, pipeline)
    from_pipeline = resolve_teacher(pipeline)
    assert from_dir.family is COGVIDEOX and from_pipeline.family is COGVIDEOX
    assert isinstance(from_dir.arch, CogVideoXArch) and from_pipeline.arch == from_dir.arch
    assert from_pipeline.pipeline_dir == pipeline

    ckpt = hf_to_megatron_checkpoint(transformer, str(tmp_path / "ckpt"))
    assert read_checkpoint_meta(ckpt)["model"] == "cogvideox"
    from_ckpt = resolve_teacher(ckpt, pipeline)
    assert from_ckpt.kind == "megatron" and from_ckpt.family is COGVIDEOX and from_ckpt.arch == from_dir.arch


def test_unknown_transformer_class_is_a_one_line_error_listing_the_known_ones(tmp_path):
    model = tmp_path / "flux"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 2}))
    with pytest.raises(ConfigError) as err:
        resolve_teacher(str(model))
    text = _one_line(err.value)
    assert "'FluxTransformer2DModel'" in text and "CogVideoXTransformer3DModel" in text
    assert text.startswith(f"model.teacher={str(model)!r}: ")

    pipeline = write_scheduler_pipeline(str(tmp_path / "pipeline"), COGVIDEOX)
    os.symlink(model, os.path.join(pipeline, "transformer"))
    with pytest.raises(ConfigError, match="'FluxTransformer2DModel' is not a known diffusers transformer"):
        resolve_teacher(pipeline)
    with pytest.raises(ValueError) as err:
        get_family("flux")
    assert "known: cogvideox" in _one_line(err.value)


def test_a_pooled_text_embedding_reaches_the_backbone_through_cfg():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(sample=kwargs["hidden_states"] * kwargs["encoder_hidden_states"].mean())

    x, t = torch.randn(2, 3, 4), torch.tensor([5.0, 7.0])
    text, negative = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    pooled, negative_pooled = torch.randn(2, 10), torch.randn(2, 10)
    batch = PhaseBatch(text=text, negative=negative, fake_noise=x, generator_noise=x, pooled=pooled,
                       negative_pooled=negative_pooled)
    fn = DiTFunction(Recorder())
    cfg_model_output(fn, x, t, batch.cond, batch.uncond, 2.0)
    assert isinstance(batch.cond, TextCondition)
    torch.testing.assert_close(calls[0]["pooled_projections"], torch.cat([negative_pooled, pooled]))
    torch.testing.assert_close(calls[0]["encoder_hidden_states"], torch.cat([negative, text]))
    assert "image_rotary_emb" not in calls[0]

    without = PhaseBatch(text=text, negative=negative, fake_noise=x, generator_noise=x)
    assert without.cond is text  # CogVideoX: the bare embedding, as before
    rotary = (torch.ones(3, 2), torch.zeros(3, 2))
    DiTFunction(Recorder(), rotary)(x, t, without.cond)
    assert "pooled_projections" not in calls[1] and calls[1]["image_rotary_emb"] is rotary


# -- a family registered by a test -------------------------------------------------------------


class FakeVideoTransformer(CogVideoXTransformer3DModel):
    """A diffusers class of another name (``save_pretrained`` writes it as ``_class_name``)."""


@dataclasses.dataclass(frozen=True)
class FakeArch(CogVideoXArch):
    family: ClassVar[str] = "fakevideo"


@pytest.fixture
def fake_family():
    built = []

    def build(arch, **kwargs):
        from adm_megatron.models.build import build_model

        built.append(arch)
        return build_model(arch, **kwargs)

    def arch_from_config(config, source="config"):
        return FakeArch.from_diffusers_config({k: v for k, v in config.items() if k != "_class_name"}, source)

    family = register_family(dataclasses.replace(
        COGVIDEOX, name="fakevideo", diffusers_classes=("FakeVideoTransformer",),
        pipeline_classes=("FakeVideoPipeline",), arch_from_diffusers_config=arch_from_config,
        arch_to_diffusers_config=lambda arch: {"_class_name": "FakeVideoTransformer", **arch.to_diffusers_config()},
        build_model=build, diffusers_model_class=lambda: FakeVideoTransformer, presets={}, tools=frozenset(),
    ))
    try:
        yield family, built
    finally:
        unregister_family("fakevideo")
    assert "fakevideo" not in family_names()


def _save_fake(directory) -> str:
    reference = make_diffusers_model("2b", seed=3)
    model = FakeVideoTransformer.from_config(reference.config)
    model.load_state_dict(reference.state_dict())
    model.save_pretrained(str(directory))
    return str(directory)


def test_a_registered_family_is_picked_up_by_teacher_loader_trainer_and_converter(fake_family, tmp_path,
                                                                                  world_of_one):
    family, built = fake_family
    teacher = _save_fake(tmp_path / "fake")
    assert json.load(open(os.path.join(teacher, "config.json")))["_class_name"] == "FakeVideoTransformer"
    pipeline = write_scheduler_pipeline(str(tmp_path / "pipeline"), family)

    source = resolve_teacher(teacher, pipeline)
    assert source.family is family and isinstance(source.arch, FakeArch)

    # the converter: the checkpoint records the family, the round trip is bit-exact in the family's class
    ckpt = hf_to_megatron_checkpoint(teacher, str(tmp_path / "ckpt"))
    assert read_checkpoint_meta(ckpt)["model"] == "fakevideo"
    assert resolve_teacher(ckpt, pipeline).family is family
    back = megatron_to_hf_checkpoint(ckpt, str(tmp_path / "back"))
    assert json.load(open(os.path.join(back, "config.json")))["_class_name"] == "FakeVideoTransformer"
    original, restored = load_file(os.path.join(teacher, WEIGHTS)), load_file(os.path.join(back, WEIGHTS))
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)

    # the trainer: built by the family's builder, checkpoints and export in the family's names
    from adm_megatron.train.trainer import Trainer

    built.clear()
    out = tmp_path / "run"
    config = load_config(None, [
        f"model.teacher={teacher}", f"model.pipeline={pipeline}", f"output_dir={out}", "data.num_prompts=2",
        "data.batch_size=1", "data.frames=2", "data.height=4", "data.width=4", "distill.generator_steps=2",
        "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=8", "train.max_iterations=1",
        "train.num_samples=0", "logging.wandb_mode=disabled", "logging.progress=false",
    ])
    result = Trainer(config).fit()
    assert len(built) == 3 and all(isinstance(a, FakeArch) for a in built)  # teacher, fake score, generator
    meta = read_checkpoint_meta(str(out / "checkpoints" / "iter_0000001" / "generator"))
    assert meta["model"] == "fakevideo"
    exported = FakeVideoTransformer.from_pretrained(result.generator_dir)
    assert type(exported) is FakeVideoTransformer


def test_the_converter_cli_offers_the_registered_families(fake_family):
    tool = load_tool("convert_checkpoint")
    args = tool.build_parser().parse_args(["hf-to-megatron", "--model", "fakevideo", "--hf-path", "x", "--out", "y"])
    assert args.model == "fakevideo"
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["hf-to-megatron", "--model", "flux", "--hf-path", "x", "--out", "y"])


def test_a_family_with_a_pooled_embedding_refuses_prompts_without_one(fake_family, tmp_path):
    import torch

    from adm_megatron.data import write_embedding_shards
    from adm_megatron.families import Conditioning
    from adm_megatron.train.validate import validate_run

    family, _ = fake_family
    unregister_family(family.name)
    register_family(dataclasses.replace(family, conditioning=lambda arch: Conditioning(16, 32, pooled_width=64)))
    teacher = _save_fake(tmp_path / "fake")
    prompts = write_embedding_shards(str(tmp_path / "emb"), ["a"], torch.zeros(1, 16, 32), torch.zeros(16, 32))
    config = load_config(None, [f"model.teacher={teacher}", "data.frames=2", "data.height=4", "data.width=4",
                                "distill.head_every=1", "data.source=shards", f"data.path={prompts}"])
    with pytest.raises(ConfigError, match="pooled embeddings of width 0, the teacher takes 64") as err:
        validate_run(config, resolve_teacher(teacher), world_size=1)
    _one_line(err.value)


def test_bench_and_memory_planner_refuse_a_family_without_their_formulas_in_one_line(fake_family, tmp_path):
    from adm_megatron.bench.run import BenchOptions, resolve_model
    from adm_megatron.memory.plan import PlanError
    from adm_megatron.memory.run_plan import plan_run

    teacher = _save_fake(tmp_path / "fake")
    config = load_config(None, [f"model.teacher={teacher}", "data.frames=2", "data.height=4", "data.width=4",
                                "distill.head_every=1"])
    with pytest.raises(PlanError, match=r"memory planner: model family 'fakevideo' is not supported "
                                        r"\(supported: cogvideox, sd3\)") as err:
        plan_run(config, 1, card_gib=80)
    _one_line(err.value)
    with pytest.raises(ValueError, match=r"adm-megatron bench: model family 'fakevideo' is not supported") as err:
        resolve_model(BenchOptions(model=teacher), str(tmp_path / "work"))
    _one_line(err.value)


def test_adp_pixel_branch_refuses_a_family_that_does_not_say_how_it_decodes(fake_family, tmp_path):
    """The pixel discriminator decodes as the family's pipeline does (``decode_images``); a family
    without it is refused in one line, and a family that lists the tool must give it."""
    from adm_megatron.config import ConfigError
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import _check_pixel_branch

    family, _ = fake_family
    config = load_config(None, [f"model.teacher={_save_fake(tmp_path / 'fake')}", "data.real_path=pairs",
                                "distill.method=adp", "distill.pixel_encoder_path=sam"])
    with pytest.raises(ConfigError, match=r"^distill.pixel_weight=0.15: model family 'fakevideo' is not supported "
                                          r"\(supported: cogvideox, sd3\); set distill.pixel_weight=0$") as err:
        _check_pixel_branch(config, resolve_teacher(config.model.teacher, config.model.pipeline))
    _one_line(err.value)
    with pytest.raises(ValueError, match="tool 'pixel-discriminator' needs vae_class and decode_images"):
        dataclasses.replace(family, tools=frozenset({"pixel-discriminator"}), vae_class=None)


def test_make_tiny_pipeline_builds_each_familys_tiny_pipelines(tmp_path, capsys):
    """``tools/make_tiny_pipeline.py --like NAME`` writes the named family's pipeline (its pipeline
    class, and the variant's architecture), refuses a non-empty --out in one line, and offers the
    tiny pipelines of every registered family."""
    from adm_megatron.families import family_of_model_dir, tiny_pipeline_names

    tool = load_tool("make_tiny_pipeline")
    assert tiny_pipeline_names() == ("cogvideox-2b", "cogvideox-5b", "sd3-medium", "sd3.5")
    variant = {  # what tells the variants apart in the transformer's config
        "cogvideox-2b": ("use_rotary_positional_embeddings", False), "cogvideox-5b": ("use_rotary_positional_embeddings", True),
        "sd3-medium": ("qk_norm", None), "sd3.5": ("qk_norm", "rms_norm"),
    }
    for name, (key, value) in variant.items():
        out = str(tmp_path / name)
        assert tool.main(["--like", name, "--out", out]) == 0
        family = family_of_model_dir(os.path.join(out, "transformer"))
        assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == family.pipeline_classes[0]
        assert name.startswith(family.name) and json.load(open(os.path.join(out, "transformer", "config.json")))[key] == value
    capsys.readouterr()
    assert tool.main(["--like", "sd3.5", "--out", str(tmp_path / "sd3.5")]) == 2
    assert capsys.readouterr().err.strip() == (f"make_tiny_pipeline.py: --out {tmp_path / 'sd3.5'}: output directory "
                                              "is not empty (pass --overwrite)")  # not overwrite=True
    from transformers import AutoConfig  # ADP's pixel encoders, as distill.pixel_encoder_path reads them

    for kind, model_type in (("sam", "sam_vision_model"), ("dinov2", "dinov2")):
        assert tool.main(["--pixel-encoder", kind, "--out", str(tmp_path / kind)]) == 0
        found = AutoConfig.from_pretrained(str(tmp_path / kind), local_files_only=True)
        assert (found.model_type, found.num_hidden_layers) == (model_type, 4)
    assert tool.main(["--pixel-encoder", "sam", "--out", str(tmp_path / "sam")]) == 2
