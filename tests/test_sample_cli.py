"""``adm-megatron sample`` renders an exported tiny generator and the teacher through the real
``CogVideoXPipeline`` (prompts encoded by the pipeline's T5), writes the files and the seconds per
sample, and names bad input in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from adm_megatron.data.tiny_pipeline import build_tiny_pipeline


def test_sample_renders_the_exported_generator_and_the_teacher(tmp_path, world_of_one, capsys, monkeypatch):
    import imageio.v3 as iio
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.cli import main
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"))
    out = tmp_path / "samples"
    batches = []  # the batch of every transformer call: one per step, 2 with CFG (cond + uncond)
    original = CogVideoXTransformer3DModel.forward
    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward",
                        lambda self, hidden_states, *a, **k: batches.append(hidden_states.shape[0])
                        or original(self, hidden_states, *a, **k))
    assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "a red cat",
                 "--prompt", "a blue car", "--steps", "2", "--teacher-steps", "3", "--format", "png",
                 "--out", str(out)]) == 0
    result = json.loads((out / "sample_timing.json").read_text())
    runs = {r["model"]: r for r in result["runs"]}
    assert (runs["generator"]["steps"], runs["teacher"]["steps"]) == (2, 3)
    assert runs["generator"]["transformer"] == generator
    assert result["environment"]["command"].startswith("adm-megatron sample --pipeline")
    images = {}
    for name, run in runs.items():
        assert len(run["seconds"]) == 2 and run["seconds_per_sample"] > 0
        assert run["paths"] == [str(out / name / f"sample-{i:03d}.png") for i in range(2)]
        images[name] = [iio.imread(p) for p in run["paths"]]
        assert all(image.shape == (32, 9 * 32, 3) for image in images[name])  # 9 frames of 32 x 32 side by side
    assert not np.array_equal(images["generator"][0], images["generator"][1])  # the prompts differ
    assert batches == [1] * 2 * 2 + [2] * 3 * 2  # generator: 2 steps, no CFG; teacher: 3 steps with CFG
    assert "s / sample" in capsys.readouterr().out

    assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "x", "--steps", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == "adm-megatron sample: --steps 0: expected >= 1"
    for flag, scale in (("--guidance-scale", "nan"), ("--guidance-scale", "-3"), ("--teacher-guidance-scale", "inf")):
        assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "x", "--steps", "1",
                     flag, scale, "--out", str(tmp_path / "bad")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"adm-megatron sample: {flag} {float(scale)}: expected a finite number >= 1 (1: no CFG; the pipeline "
            "applies CFG above 1 only)")
    assert not (tmp_path / "bad").exists()


def test_bad_steps_seeds_and_output_modes_are_one_line_before_anything_is_written(tmp_path, world_of_one, capsys,
                                                                                    monkeypatch):
    """--steps 0 on a generator distilled for 3 steps was a note that it samples with 0, then the
    refusal; --seed -1 was taken (torch folds it onto 2**64 - 1, and sample 1 then repeats seed 0's
    noise), a seed + i past 2**64 - 1 failed after the first sample was written; --overwrite with
    --resume was taken (and overwrote); --teacher-guidance-scale without a teacher was ignored. Each
    is refused before the rendering code is imported (it was after: 10-25 s on a loaded machine)."""
    import sys

    from adm_megatron.cli import main
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"), record={"generator_steps": 3})
    out = tmp_path / "samples"
    args = ["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "a red cat", "--prompt", "x",
            "--teacher-steps", "0", "--format", "png", "--out", str(out)]
    capsys.readouterr()
    with monkeypatch.context() as patch:  # refused before the rendering code (megatron-core: seconds) is imported
        patch.setitem(sys.modules, "adm_megatron.sampling", None)
        for extra, message in ((["--steps", "0"], "--steps 0: expected >= 1"),
                               (["--seed", "-1"], f"--seed -1: expected 0 to {2**64 - 2} (sample i is seeded with "
                                                  "--seed + i, and torch.Generator.manual_seed takes 0 to 2**64 - 1)"),
                               (["--seed", str(2**64 - 1)], f"--seed {2**64 - 1}: expected 0 to {2**64 - 2} "),
                               (["--guidance-scale", "0"], "--guidance-scale 0.0: expected a finite number >= 1"),
                               (["--overwrite", "--resume"], "--overwrite with --resume: give one (--overwrite "
                                                             "replaces --out, --resume finishes it)"),
                               (["--teacher-guidance-scale", "2"], "--teacher-guidance-scale 2.0 with --teacher-steps "
                                                                   "0: there is no teacher run to apply it to; drop "
                                                                   "one of them")):
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"adm-megatron sample: {message}") and err.count("\n") == 1, err
            assert not out.exists()
    assert main([*args, "--seed", str(2**64 - 2)]) == 0  # the last seed that seeds both samples
    assert sorted(os.listdir(out / "generator")) == ["sample-000.png", "sample-001.png"]


def test_sample_takes_the_distilled_step_count_and_never_mixes_runs(tmp_path, world_of_one, capsys, monkeypatch):
    """Without --steps the generator is sampled with the count in its distillation.json (a different
    --steps is taken, with a note); a directory without the record needs --steps; a non-empty --out is
    refused, and --overwrite leaves no file of the earlier run; --dtype runs the pipeline in it."""
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.cli import main
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"), record={"generator_steps": 3})
    bare = export_generator(model, model.arch, str(tmp_path / "bare"))  # no record: a converted checkpoint
    calls = []  # the dtype of every transformer call
    original = CogVideoXTransformer3DModel.forward
    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward",
                        lambda self, hidden_states, *a, **k: calls.append(hidden_states.dtype)
                        or original(self, hidden_states, *a, **k))
    out = tmp_path / "samples"
    args = ["sample", "--pipeline", pipeline, "--prompt", "a red cat", "--format", "png"]

    assert main([*args, "--generator", generator, "--teacher-steps", "2", "--out", str(out)]) == 0
    assert calls == [torch.float32] * (3 + 2)  # 3 generator steps from the record, fp32 on CPU
    assert json.loads((out / "sample_timing.json").read_text())["runs"][0]["distillation"] == {"generator_steps": 3}
    capsys.readouterr()

    calls.clear()
    assert main([*args, "--generator", generator, "--teacher-steps", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --out {out}: exists and is not empty (pass --overwrite to replace it, or --resume to "
        "finish it)")
    assert calls == [] and (out / "teacher").is_dir()  # refused before any sampling, nothing touched

    assert main([*args, "--generator", generator, "--teacher-steps", "0", "--steps", "2", "--dtype", "bf16",
                 "--out", str(out), "--overwrite"]) == 0
    assert (f"adm-megatron sample: note: {generator} was distilled for 3 steps; sampling it with 2"
            in capsys.readouterr().err.splitlines())
    assert calls == [torch.bfloat16] * 2
    assert sorted(os.listdir(out)) == [".run.lock", "generator", "sample_args.json", "sample_timing.json"]  # no teacher/

    calls.clear()
    assert main([*args, "--generator", bare, "--out", str(tmp_path / "bare_samples")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --steps: {bare} has no distillation.json (adm-megatron train writes it into "
        "generator/); give the step count the generator was distilled for")
    assert calls == []

    kept = sorted(os.listdir(generator))  # --out over what it renders from: refused, even with --overwrite
    for out, relation, flag, path in ((tmp_path, "contains", "--pipeline", pipeline),
                                      (generator, "is", "--generator", generator),
                                      (tmp_path / "pipe", "is", "--pipeline", pipeline),
                                      (os.path.join(pipeline, "vae"), "lies inside", "--pipeline", pipeline)):
        assert main([*args, "--generator", generator, "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"adm-megatron sample: --out {out}: {relation} the {flag} {path} it renders from; choose another --out")
    assert sorted(os.listdir(generator)) == kept and calls == []
    weights = os.path.join(generator, "diffusion_pytorch_model.safetensors")  # a copy cut short
    size = os.path.getsize(weights)
    os.truncate(weights, size - 1000)
    assert main([*args, "--generator", generator, "--out", str(tmp_path / "cut_samples")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: {weights}: truncated ({size - 1000} bytes, its header needs {size})")
    assert calls == [] and not (tmp_path / "cut_samples").exists()
    run = tmp_path / "run"  # a run's directory, not its generator/
    (run / "generator").mkdir(parents=True)
    (run / "generator" / "config.json").write_text("{}")
    assert main([*args, "--generator", str(run), "--out", str(tmp_path / "run_samples")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --generator {run}: a run directory: its exported generator is {run / 'generator'}")


def test_sample_renders_a_lora_directory_as_its_merged_generator(tmp_path, world_of_one, capsys):
    """``--generator`` a run's ``generator_lora/`` (the LoRA file alone) samples the teacher with the
    adapters loaded through the pipeline's ``load_lora_weights``: the merged export's images (to
    one 8-bit level), and not the teacher's. The adapters stay beside the teacher's weights, which
    are left bit for bit as they are: fused into bf16 weights, a small trained delta would mostly
    round away."""
    import imageio.v3 as iio

    from adm_megatron.cli import main
    from adm_megatron.config import LoraConfig
    from adm_megatron.lora import apply_lora
    from adm_megatron.lora.export import export_lora_generator
    from adm_megatron.models import build_model_from_hf

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    adapters = apply_lora(model, LoraConfig(rank=2, alpha=4.0, target_modules=["to_out.0", "ff.net.2"]), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    export_lora_generator(model, model.arch, str(tmp_path / "generator"), "both", record={"generator_steps": 2})
    images = {}
    for name, generator in (("merged", tmp_path / "generator"), ("lora", tmp_path / "generator_lora"),
                            ("teacher", f"{pipeline}/transformer")):
        out = tmp_path / f"samples_{name}"
        steps = ["--steps", "2"] if name == "teacher" else []  # the LoRA directory's record says 2
        assert main(["sample", "--pipeline", pipeline, "--generator", str(generator), "--prompt", "a red cat",
                     "--format", "png", "--teacher-steps", "0", *steps, "--out", str(out)]) == 0
        images[name] = iio.imread(out / "generator" / "sample-000.png").astype(int)
    assert np.abs(images["lora"] - images["merged"]).max() <= 1
    assert np.abs(images["lora"] - images["teacher"]).max() > 10  # the adapters matter

    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.models.cogvideox_samples import _load_pipeline

    loaded = _load_pipeline(pipeline, str(tmp_path / "generator_lora"), torch.bfloat16, torch.device("cpu"))
    teacher = CogVideoXTransformer3DModel.from_pretrained(f"{pipeline}/transformer", torch_dtype=torch.bfloat16)
    base = {n.replace(".base_layer", ""): p for n, p in loaded.transformer.named_parameters() if "lora_" not in n}
    assert base.keys() == dict(teacher.named_parameters()).keys()
    assert all(torch.equal(base[n], p) for n, p in teacher.named_parameters())  # not fused
    assert any("lora_B" in n for n, _ in loaded.transformer.named_parameters())

    lora_file = tmp_path / "generator_lora" / "pytorch_lora_weights.safetensors"  # a copy cut short
    os.truncate(lora_file, 6)
    capsys.readouterr()
    assert main(["sample", "--pipeline", pipeline, "--generator", str(tmp_path / "generator_lora"), "--prompt", "x",
                 "--teacher-steps", "0", "--out", str(tmp_path / "cut")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: {lora_file}: not a readable safetensors file (6 bytes; truncated?)")


def _lora_on_a_moved_base(tmp_path, base_name: str, record):
    """A tiny pipeline; its transformer moved far, exported as ``tmp_path/base_name`` (a stage-1
    generator, a fine-tuned teacher); LoRA adapters on that base exported merged (``generator/``) and
    as a LoRA file (``generator_lora/``) with ``record(pipeline, base)`` as their distillation.json.
    Returns (pipeline, base, that record)."""
    from adm_megatron.config import LoraConfig
    from adm_megatron.lora import apply_lora
    from adm_megatron.lora.export import export_lora_generator
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    base = export_generator(model, model.arch, str(tmp_path / base_name))
    adapters = apply_lora(model, LoraConfig(rank=2, alpha=4.0, target_modules=["to_out.0", "ff.net.2"]), seed=0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    written = record(pipeline, base)
    export_lora_generator(model, model.arch, str(tmp_path / "generator"), "both", record=written)
    return pipeline, base, written


def _sample_merged_and_lora(pipeline: str, tmp_path, teacher_steps: int) -> tuple[dict, dict]:
    """``sample`` of ``generator/`` and ``generator_lora/`` (one png each, "a red cat"): their
    generator images and their sample_timing.json runs, by directory name."""
    import imageio.v3 as iio

    from adm_megatron.cli import main

    images, runs = {}, {}
    for name in ("generator", "generator_lora"):
        out = tmp_path / f"samples_{name}"
        assert main(["sample", "--pipeline", pipeline, "--generator", str(tmp_path / name), "--prompt", "a red cat",
                     "--format", "png", "--teacher-steps", str(teacher_steps), "--out", str(out)]) == 0
        images[name] = iio.imread(out / "generator" / "sample-000.png").astype(int)
        runs[name] = json.loads((out / "sample_timing.json").read_text())["runs"]
    return images, runs


def test_a_lora_directory_samples_on_the_generator_it_was_trained_from(tmp_path, world_of_one, capsys):
    """A LoRA run started from ``model.generator_init`` (a LoRA stage after ADP) trained its adapters
    on that generator, which its ``distillation.json`` records: ``sample`` puts them there, so the
    LoRA directory renders the merged export (to one 8-bit level), not the teacher plus the adapters.
    Adapters that do not fit the base (another model's) are refused in one line before rendering, and
    a pipeline other than the recorded one gets a note."""
    from safetensors.torch import load_file, save_file

    from adm_megatron.cli import main

    pipeline, init, record = _lora_on_a_moved_base(  # stage 1's generator: the teacher moved far
        tmp_path, "stage1", lambda pipe, base: {"generator_steps": 2, "teacher": pipe, "generator_init": base})
    images, runs = _sample_merged_and_lora(pipeline, tmp_path, teacher_steps=0)
    for name in images:
        assert runs[name][0]["transformer"] == (init if name == "generator_lora" else str(tmp_path / name))
    assert np.abs(images["generator_lora"] - images["generator"]).max() <= 1
    assert "was distilled with" not in capsys.readouterr().err

    other = build_tiny_pipeline(str(tmp_path / "other"), seed=1)  # same model class, another teacher
    assert main(["sample", "--pipeline", other, "--generator", str(tmp_path / "generator"), "--prompt", "x",
                 "--format", "png", "--teacher-steps", "0", "--out", str(tmp_path / "samples_other")]) == 0
    assert (f"note: {tmp_path / 'generator'} was distilled with {pipeline} (distillation.json); sampling it through "
            f"--pipeline {other}") in capsys.readouterr().err

    lora_file = tmp_path / "generator_lora" / LORA_FILE
    state = load_file(lora_file)
    for case, (key, tensor) in {  # adapters on a layer the base lacks, and on one of another width
            "missing": ("transformer.transformer_blocks.7.ff.net.2.lora_A.weight", torch.zeros(2, 64)),
            "shape": ("transformer.transformer_blocks.0.ff.net.2.lora_B.weight", torch.zeros(5, 2))}.items():
        (tmp_path / case).mkdir()
        (tmp_path / case / "distillation.json").write_text(json.dumps(record))
        save_file({**state, key: tensor}, str(tmp_path / case / LORA_FILE))
        assert main(["sample", "--pipeline", pipeline, "--generator", str(tmp_path / case), "--prompt", "x",
                     "--teacher-steps", "0", "--out", str(tmp_path / f"samples_{case}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"adm-megatron sample: --generator {tmp_path / case}: adapter {key} "
                              f"{list(tensor.shape)} does not fit {init} (") and "\n" not in err, err
        assert err.endswith("LoRA adapters of another model") and not (tmp_path / f"samples_{case}").exists()

    import shutil

    shutil.rmtree(init)
    assert main(["sample", "--pipeline", pipeline, "--generator", str(tmp_path / "generator_lora"), "--prompt", "x",
                 "--teacher-steps", "0", "--out", str(tmp_path / "samples_gone")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --generator {tmp_path / 'generator_lora'}: its adapters were trained on "
        f"model.generator_init={init} (distillation.json), which is not there; sample the run's merged generator/ "
        "instead")


def test_a_teacher_given_as_a_transformer_beside_its_pipeline_is_the_one_sampled(tmp_path, world_of_one, capsys):
    """A run whose ``model.teacher`` is a transformer directory beside ``model.pipeline`` (a fine-tuned
    teacher) trained its LoRA adapters on that teacher, not on the pipeline's own transformer, and its
    ``distillation.json`` records both: the LoRA directory renders the merged export (to one 8-bit
    level; on the pipeline's transformer it was far off), and the teacher run renders that teacher.
    When the recorded teacher is gone, a one-line refusal."""
    import shutil

    from adm_megatron.cli import main

    pipeline, teacher, record = _lora_on_a_moved_base(  # the fine-tuned teacher: the pipeline's transformer moved far
        tmp_path, "finetuned", lambda pipe, base: {"generator_steps": 2, "teacher": base, "pipeline": pipe})
    images, runs = _sample_merged_and_lora(pipeline, tmp_path, teacher_steps=1)
    for name in images:
        assert [r["transformer"] for r in runs[name]] == [
            teacher if name == "generator_lora" else str(tmp_path / name), teacher]
    assert np.abs(images["generator_lora"] - images["generator"]).max() <= 1

    shutil.rmtree(teacher)
    capsys.readouterr()
    assert main(["sample", "--pipeline", pipeline, "--generator", str(tmp_path / "generator_lora"), "--prompt", "x",
                 "--teacher-steps", "0", "--out", str(tmp_path / "samples_gone")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --generator {tmp_path / 'generator_lora'}: the teacher {teacher} it was distilled "
        f"from (distillation.json, beside model.pipeline={pipeline}) is not there")

    # the pipeline's own transformer named as model.teacher: a moved copy of the pipeline renders it
    moved = shutil.copytree(pipeline, tmp_path / "moved")
    (tmp_path / "generator_lora" / "distillation.json").write_text(json.dumps(
        {**record, "teacher": os.path.join(pipeline, "transformer")}))
    shutil.rmtree(pipeline)
    out = tmp_path / "samples_moved"
    assert main(["sample", "--pipeline", str(moved), "--generator", str(tmp_path / "generator_lora"), "--prompt", "x",
                 "--teacher-steps", "1", "--out", str(out)]) == 0
    assert [r["transformer"] for r in json.loads((out / "sample_timing.json").read_text())["runs"]] == [
        str(moved / "transformer")] * 2


def test_an_exported_generators_readme_samples_it_with_diffusers_alone(tmp_path, world_of_one):
    """The README.md beside a generator exported with a run's record is the diffusers call that
    ``sample`` makes: run in a fresh process from that directory it renders ``sample``'s video pixel
    for pixel, on a pipeline that ships CogVideoX-5b's stochastic ``CogVideoXDPMScheduler`` (its
    ``CogVideoXDDIMScheduler`` swapped in), at the distilled size, steps and text length, without CFG."""
    import imageio.v3 as iio

    from adm_megatron.cli import main
    from adm_megatron.config import load_config
    from adm_megatron.convert.distillation_record import distillation_record
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator
    from model_card_run import render_card

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        path = os.path.join(pipeline, name)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"))
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "cogvideox",
                                      "tiny_cpu.yaml"),
                         [f"model.teacher={pipeline}", "data.frames=2", "data.height=4", "data.width=6",
                          "distill.generator_steps=2"])
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"),
                                 record=distillation_record(config, 7, model.arch))
    assert json.loads((tmp_path / "generator" / "distillation.json").read_text())["sampling"] == {
        "pipeline_class": "CogVideoXPipeline", "transformer_class": "CogVideoXTransformer3DModel",
        "scheduler": "CogVideoXDDIMScheduler", "num_inference_steps": 2, "guidance_scale": 1.0,
        "height": 16, "width": 24, "num_frames": 5, "max_sequence_length": 16}
    assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "a red cat", "--seed", "3",
                 "--format", "png", "--teacher-steps", "0", "--out", str(tmp_path / "out")]) == 0
    sampled = iio.imread(tmp_path / "out" / "generator" / "sample-000.png").astype(int)
    assert np.array_equal(render_card(generator, "a red cat", 3, tmp_path), sampled)


def test_a_generator_of_a_megatron_checkpoint_teacher_gets_a_note(tmp_path, world_of_one, capsys):
    """diffusers cannot render a megatron checkpoint: when the generator's record names one as its
    teacher, the teacher run is --pipeline's own transformer, which a note says must be the same weights."""
    from adm_megatron.cli import main
    from adm_megatron.convert.checkpoint import CHECKPOINT_META_FILE
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / CHECKPOINT_META_FILE).write_text("{}")
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"), record={
        "generator_steps": 1, "teacher": str(tmp_path / "ckpt"), "pipeline": pipeline})
    capsys.readouterr()
    assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "x", "--format", "png",
                 "--teacher-steps", "1", "--out", str(tmp_path / "out")]) == 0
    assert (f"adm-megatron sample: note: {generator} was distilled from the megatron checkpoint {tmp_path / 'ckpt'} "
            "(distillation.json); the teacher here is --pipeline's own transformer, which must hold the same "
            "weights (convert_checkpoint.py megatron-to-hf gives them)") in capsys.readouterr().err.splitlines()


def test_a_pipeline_whose_transformer_is_a_distilled_generator_never_renders_it_as_the_teacher(
        tmp_path, world_of_one, capsys):
    """export --pipeline-out's pipeline holds the generator (with its distillation.json) as its
    transformer: its teacher run rendered the generator at the teacher's steps and CFG. It renders the
    teacher the record names (with a note), or, when that is not here, is refused in one line."""
    import shutil

    from adm_megatron.cli import main

    teacher = build_tiny_pipeline(str(tmp_path / "teacher"), seed=0)
    exported = str(tmp_path / "exported")
    shutil.copytree(teacher, exported)  # as --pipeline-out writes it (the generator: any transformer here)
    record = {"generator_steps": 1, "teacher": teacher, "pipeline": None}
    with open(os.path.join(exported, "transformer", "distillation.json"), "w") as f:
        json.dump(record, f)
    own = os.path.join(exported, "transformer")
    args = ["sample", "--pipeline", exported, "--generator", own, "--prompt", "x", "--format", "png",
            "--teacher-steps", "1"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    runs = json.loads((tmp_path / "out" / "sample_timing.json").read_text())["runs"]
    assert [r["transformer"] for r in runs] == [own, os.path.join(teacher, "transformer")]
    assert (f"adm-megatron sample: note: {own} is a distilled generator (distillation.json); the teacher run renders "
            f"the teacher it was distilled from, {teacher}/transformer") in capsys.readouterr().err.splitlines()

    with open(os.path.join(own, "distillation.json"), "w") as f:  # handed over: its teacher is not here
        json.dump({**record, "teacher": str(tmp_path / "elsewhere")}, f)
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --teacher-steps: {own} is a distilled generator (distillation.json), not a teacher, and "
        f"the teacher it was distilled from ({tmp_path / 'elsewhere'}) is not here: pass --teacher-steps 0, or give "
        "the teacher's own pipeline as --pipeline")
    assert not (tmp_path / "refused").exists()


LORA_FILE = "pytorch_lora_weights.safetensors"


def _sample_counted(args: list[str]) -> tuple[int, int]:
    """``adm-megatron sample ARGS`` in this process (a rank of a world, or alone): its exit code and
    the transformer calls it made."""
    from diffusers import SD3Transformer2DModel

    from adm_megatron.cli import main

    calls = []
    original = SD3Transformer2DModel.forward
    SD3Transformer2DModel.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        return main(["sample", *args]), len(calls)
    finally:
        SD3Transformer2DModel.forward = original


def test_sample_splits_a_prompt_file_over_the_ranks_of_a_world(tmp_path, capsys):
    """Under a 2-process launch each rank renders its contiguous share of --prompt-file's prompts
    (3 prompts, 2 steps: 4 and 2 transformer calls), and the files -- the grid included -- are the
    one-process files, pixel for pixel; rank 0 writes the timing of all of them."""
    import imageio.v3 as iio
    from multiproc import run_world

    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    pipeline = build_tiny_sd3_pipeline(str(tmp_path / "pipe"), seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\nblue sky\n  a cat  \n")
    common = ["--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--steps", "2",
              "--teacher-steps", "0", "--prompt-file", str(prompts)]
    assert _sample_counted([*common, "--out", str(tmp_path / "one")]) == (0, 6)
    assert run_world(_sample_counted, 2, [*common, "--out", str(tmp_path / "two")], timeout_s=600) == [(0, 4), (0, 2)]
    names = ["grid.png", "sample-000.png", "sample-001.png", "sample-002.png"]
    assert sorted(os.listdir(tmp_path / "two" / "generator")) == names
    for name in names:
        assert np.array_equal(iio.imread(tmp_path / "two" / "generator" / name),
                              iio.imread(tmp_path / "one" / "generator" / name)), name
    timing = json.loads((tmp_path / "two" / "sample_timing.json").read_text())
    assert timing["ranks"] == 2 and timing["prompts"] == ["a red cube", "blue sky", "a cat"]
    assert len(timing["runs"][0]["seconds"]) == 3 and timing["runs"][0]["paths"][-1].endswith("grid.png")

    # 2 samples of each prompt: 6 samples, prompt p's k-th is sample 2 p + k, from its own noise
    assert _sample_counted([*common, "--samples-per-prompt", "2", "--out", str(tmp_path / "twice")]) == (0, 12)
    twice = json.loads((tmp_path / "twice" / "sample_timing.json").read_text())
    assert twice["prompts"] == ["a red cube", "a red cube", "blue sky", "blue sky", "a cat", "a cat"]
    first, second = (iio.imread(tmp_path / "twice" / "generator" / f"sample-00{i}.png") for i in (2, 3))
    assert not np.array_equal(first, second)  # one prompt, two noises
    assert np.array_equal(iio.imread(tmp_path / "twice" / "generator" / "sample-000.png"),
                          iio.imread(tmp_path / "one" / "generator" / "sample-000.png"))

    capsys.readouterr()
    (tmp_path / "blank.txt").write_text("\n \n")
    assert _sample_counted([*common[:-1], str(tmp_path / "blank.txt"), "--out", str(tmp_path / "x")]) == (2, 0)
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: {tmp_path / 'blank.txt'}: no prompts (the file is empty or blank; expected one per line)")


def test_a_resumed_sampling_renders_only_the_missing_samples(tmp_path, capsys):
    """--resume on an output started with the same arguments keeps its complete sample files and
    renders only the missing one (a killed write's partial file does not count), ending with the
    files of an uninterrupted run; other arguments or a foreign directory are one-line refusals."""
    import shutil

    import imageio.v3 as iio

    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    pipeline = build_tiny_sd3_pipeline(str(tmp_path / "pipe"), seed=0)
    args = ["--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--steps", "2", "--teacher-steps", "0",
            "--prompt", "a red cube", "--prompt", "blue sky", "--prompt", "a cat"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _sample_counted([*args, "--out", str(full)]) == (0, 6)
    shutil.copytree(full, cut)  # as a job killed while writing sample 1 leaves it
    (cut / "generator" / "sample-001.png").rename(cut / "generator" / "sample-001.partial.png")
    (cut / "generator" / "grid.png").unlink()
    (cut / "sample_timing.json").unlink()
    capsys.readouterr()
    assert _sample_counted([*args, "--out", str(cut), "--resume"]) == (0, 2)  # one sample of 2 steps
    assert "generator      2   1.0        1" in capsys.readouterr().out
    assert sorted(os.listdir(cut / "generator")) == sorted(os.listdir(full / "generator"))
    for name in os.listdir(full / "generator"):
        assert np.array_equal(iio.imread(cut / "generator" / name), iio.imread(full / "generator" / name)), name
    timing = json.loads((cut / "sample_timing.json").read_text())
    assert len(timing["invocations"]) == 1  # the killed one wrote no timing file: its samples are not timed
    assert (timing["runs"][0]["rendered"], timing["runs"][0]["timed"], timing["runs"][0]["timed_in"]) == (
        1, 1, [None, 0, None])

    # resumed after a whole invocation (its file removed since): the timings of both, per sample
    again = tmp_path / "again"
    shutil.copytree(full, again)
    (again / "generator" / "sample-002.png").unlink()
    capsys.readouterr()
    assert _sample_counted([*args, "--out", str(again), "--resume"]) == (0, 2)
    assert "generator      2   1.0        1      3" in capsys.readouterr().out
    first = json.loads((full / "sample_timing.json").read_text())
    timing = json.loads((again / "sample_timing.json").read_text())
    assert timing["invocations"] == first["invocations"] + [{"environment": timing["environment"], "ranks": 1}]
    run = timing["runs"][0]
    assert (run["rendered"], run["timed"], run["timed_in"]) == (1, 3, [0, 0, 1])
    assert run["seconds"][:2] == first["runs"][0]["seconds"][:2] and run["seconds"][2] > 0

    capsys.readouterr()
    assert _sample_counted([*args[:5], "3", *args[6:], "--out", str(cut), "--resume"]) == (2, 0)
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --resume: {cut} was started with other arguments (generator steps: 2 there, 3 now: "
        f"{cut / 'sample_args.json'}); use a new --out or --overwrite")  # it named no value
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert _sample_counted([*args, "--out", str(tmp_path / "other"), "--resume"]) == (2, 0)
    assert "is not an adm-megatron sample output" in capsys.readouterr().err

    # another sample writing the same --out meanwhile (the job submitted twice, array tasks given one
    # --out): refused in one line, --overwrite included, before anything of it is touched or rendered
    from adm_megatron.parallel.run_lock import RunLock

    held = RunLock(str(cut), True, "--out", "sample")
    before = {name: (cut / "generator" / name).read_bytes() for name in os.listdir(cut / "generator")}
    for extra in (["--resume"], ["--overwrite"]):
        capsys.readouterr()
        assert _sample_counted([*args, "--out", str(cut), *extra]) == (2, 0)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"adm-megatron sample: --out={str(cut)!r} is in use by another sample (host ") and \
            err.endswith("wait for it to end, or use a new --out") and "\n" not in err, err
    assert {name: (cut / "generator" / name).read_bytes() for name in os.listdir(cut / "generator")} == before
    held.release()
    assert _sample_counted([*args, "--out", str(cut), "--resume"]) == (0, 0)  # free again: nothing left to render


def test_sample_renders_at_the_distilled_size_unless_told(tmp_path, world_of_one, capsys):
    """The generator and the teacher render at the latent size in the generator's distillation.json
    (not the pipeline's native size): SD3 latents 8 x 12 are 32 x 48 pixels, CogVideoX 2 x 4 x 6 are
    num_frames=5 of 16 x 24 (which the VAE decodes into 8 frames); --height / --width / --num-frames
    override it (with a note); a size the pipeline cannot take exactly is a one-line error before any
    weights load. The teacher's CFG defaults to the middle of the generator's distillation CFG range."""
    import imageio.v3 as iio

    from adm_megatron.cli import main
    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    def generator_of(pipeline, name, latent_size):
        model = build_model_from_hf(f"{pipeline}/transformer")
        return export_generator(model, model.arch, str(tmp_path / name), record={
            "generator_steps": 1, "latent_size": latent_size, "teacher_guidance_scale": [3.0, 4.0]})

    def shapes(out):
        return {run: iio.imread(out / run / "sample-000.png").shape for run in ("generator", "teacher")}

    sd3 = build_tiny_sd3_pipeline(str(tmp_path / "sd3"), seed=0)
    common = ["sample", "--pipeline", sd3, "--prompt", "a red cube", "--teacher-steps", "1"]
    image = generator_of(sd3, "sd3_generator", {"frames": 1, "height": 8, "width": 12})
    assert main([*common, "--generator", image, "--out", str(tmp_path / "a")]) == 0
    assert shapes(tmp_path / "a") == {"generator": (32, 48, 3), "teacher": (32, 48, 3)}
    timing = json.loads((tmp_path / "a" / "sample_timing.json").read_text())
    assert timing["size"] == {"pixels": {"height": 32, "width": 48}, "latents": [1, 8, 12]}
    assert timing["runs"][1]["guidance_scale"] == 3.5  # the middle of the CFG range it was distilled against
    capsys.readouterr()
    assert main([*common, "--generator", image, "--height", "64", "--teacher-guidance-scale", "5",
                 "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "sample_timing.json").read_text())["runs"][1]["guidance_scale"] == 5.0
    assert shapes(tmp_path / "b") == {"generator": (64, 48, 3), "teacher": (64, 48, 3)}
    assert ("adm-megatron sample: note: the generator was distilled at latents 1x8x12; sampling at 1x16x12"
            in capsys.readouterr().err.splitlines())
    native = f"{sd3}/transformer"  # no record: the transformer's sample_size, 32 latents (128 pixels)
    assert main([*common, "--generator", native, "--steps", "1", "--out", str(tmp_path / "c")]) == 0
    assert shapes(tmp_path / "c")["generator"] == (128, 128, 3)
    assert json.loads((tmp_path / "c" / "sample_timing.json").read_text())["runs"][1]["guidance_scale"] == 6.0
    capsys.readouterr()
    for flags, error in ((["--width", "36"], "--width 36: expected a multiple of 8 (the VAE's 4 pixels per latent "
                                             "x the transformer's patch 2)"),
                         (["--num-frames", "9"], "--num-frames 9: this pipeline renders images"),
                         (["--height", "0"], "--height 0: expected >= 1"),
                         (["--teacher-steps", "-1"], "--teacher-steps -1: expected >= 1, or 0 for no teacher"),
                         (["--prompt-file", "/dev/null"], "/dev/null: no prompts (the file is empty or blank; "
                                                          "expected one per line)")):  # was: 'not found'
        base = common[:-2] if "--teacher-steps" in flags else common  # an option is given once
        assert main([*base, "--generator", image, *flags, "--out", str(tmp_path / "bad")]) == 2
        assert capsys.readouterr().err.strip() == f"adm-megatron sample: {error}"
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    cog = build_tiny_pipeline(str(tmp_path / "cog"), seed=0)
    video = generator_of(cog, "cog_generator", {"frames": 2, "height": 4, "width": 6})
    common = ["sample", "--pipeline", cog, "--generator", video, "--prompt", "a red cat", "--format", "png",
              "--teacher-steps", "1"]
    assert main([*common, "--out", str(tmp_path / "v")]) == 0
    assert shapes(tmp_path / "v") == {"generator": (16, 8 * 24, 3), "teacher": (16, 8 * 24, 3)}
    assert json.loads((tmp_path / "v" / "sample_timing.json").read_text())["size"] == {
        "pixels": {"height": 16, "width": 24, "num_frames": 5}, "latents": [2, 4, 6]}
    assert main([*common, "--num-frames", "9", "--out", str(tmp_path / "w")]) == 0
    assert shapes(tmp_path / "w")["generator"] == (16, 9 * 24, 3)
    capsys.readouterr()
    assert main([*common, "--num-frames", "8", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == (
        "adm-megatron sample: --num-frames 8: expected 1 + a multiple of 4 (the VAE's temporal compression)")


def test_sample_decodes_in_tiles_when_asked(tmp_path, world_of_one, monkeypatch):
    """--vae-tiling: the pipelines' VAE decodes in tiles (diffusers' enable_tiling; the tiny VAE is
    given a 24-pixel tile, so its 32-pixel frames tile), for the generator and the teacher alike, and
    the timing JSON says so; without it nothing is tiled."""
    from diffusers import AutoencoderKLCogVideoX

    from adm_megatron.cli import main

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    vae_config = os.path.join(pipeline, "vae", "config.json")
    with open(vae_config) as f:
        config = json.load(f)
    with open(vae_config, "w") as f:
        json.dump({**config, "sample_height": 48, "sample_width": 40}, f)
    calls = []
    tiled = AutoencoderKLCogVideoX.tiled_decode
    monkeypatch.setattr(AutoencoderKLCogVideoX, "tiled_decode", lambda self, *a, **k: calls.append(1)
                        or tiled(self, *a, **k))
    args = ["sample", "--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--prompt", "a red cat",
            "--steps", "1", "--teacher-steps", "1", "--format", "png"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert calls == []
    assert main([*args, "--vae-tiling", "--out", str(tmp_path / "tiled")]) == 0
    assert len(calls) == 2
    assert json.loads((tmp_path / "tiled" / "sample_timing.json").read_text())["vae_tiling"] is True


def test_a_generator_of_another_family_or_none_is_refused_before_anything_is_written(tmp_path, capsys):
    """A CogVideoX generator with an SD3 pipeline was a KeyError traceback; the other way round, a
    one-line refusal that left sample_args.json behind, so the corrected command found --out taken;
    a missing --generator was blamed on its distillation.json."""
    from adm_megatron.cli import main
    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    cogvideox = build_tiny_pipeline(str(tmp_path / "cogvideox"), seed=0)
    sd3 = build_tiny_sd3_pipeline(str(tmp_path / "sd3"), seed=0)
    capsys.readouterr()
    out = tmp_path / "samples"
    cases = [
        (sd3, f"{cogvideox}/transformer", f"--pipeline {sd3}: a StableDiffusion3Pipeline directory, but "
                                         f"{cogvideox}/transformer is a cogvideox transformer (expected a "
                                         "CogVideoXPipeline directory)"),
        (cogvideox, f"{sd3}/transformer", f"--pipeline {cogvideox}: a CogVideoXPipeline directory, but "
                                         f"{sd3}/transformer is a sd3 transformer (expected a StableDiffusion3Pipeline "
                                         "directory)"),
        (cogvideox, str(tmp_path / "nowhere"), f"--generator {tmp_path / 'nowhere'}: not found"),
    ]
    for pipeline, generator, message in cases:
        assert main(["sample", "--pipeline", pipeline, "--generator", generator, "--steps", "2", "--prompt", "x",
                     "--teacher-steps", "0", "--out", str(out)]) == 2
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adm-megatron sample:")]
        assert len(ours) == 1 and ours[0].startswith(f"adm-megatron sample: {message}"), ours
        assert not out.exists()


def test_a_format_or_pipeline_the_family_cannot_render_is_refused_before_out_is_written(tmp_path, capsys):
    """--format gif for SD3 was refused (as 'fmt=...') after --out was written, and so was a pipeline
    without its tokenizer/: the corrected command then found --out taken."""
    import shutil

    from adm_megatron.cli import main
    from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

    sd3 = build_tiny_sd3_pipeline(str(tmp_path / "sd3"), seed=0)
    cogvideox = build_tiny_pipeline(str(tmp_path / "cogvideox"), seed=0)
    shutil.rmtree(os.path.join(cogvideox, "tokenizer"))
    capsys.readouterr()
    out = tmp_path / "samples"
    for pipeline, extra, message in (
            (sd3, ["--format", "gif"], "--format gif: sd3 samples are images, written as png"),
            (cogvideox, [], f"--pipeline {cogvideox}: tokenizer/ not found, which its model_index.json lists (a whole "
                            "diffusers pipeline directory is expected)")):
        assert main(["sample", "--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--steps", "1",
                     "--prompt", "x", "--teacher-steps", "0", *extra, "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"adm-megatron sample: {message}"
        assert not out.exists()


def test_a_checkpoint_or_pipeline_given_as_generator_is_named_with_what_to_give(tmp_path, capsys):
    """A megatron checkpoint (a training checkpoint's network, or a converted one) or a whole
    pipeline as --generator was asked for --steps, then for a config.json; it is told what to give."""
    from adm_megatron.cli import main
    from adm_megatron.convert.checkpoint import CHECKPOINT_META_FILE

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    iteration = tmp_path / "run" / "checkpoints" / "iter_0000003"
    for network in (iteration / "generator", tmp_path / "converted"):
        network.mkdir(parents=True)
        (network / CHECKPOINT_META_FILE).write_text('{"model": "cogvideox"}')
    (iteration / "trainer_state.json").write_text("{}")
    capsys.readouterr()
    out = tmp_path / "samples"
    for generator, hint in (
            (iteration / "generator", f"a megatron network of the training checkpoint {iteration}: adm-megatron "
                                      f"export --checkpoint {iteration} --out DIR writes its generator as a diffusers "
                                      "directory"),
            (tmp_path / "converted", "a megatron checkpoint: python tools/convert_checkpoint.py megatron-to-hf --model "
                                     f"cogvideox --ckpt {tmp_path / 'converted'} --out DIR writes it as a diffusers "
                                     "directory"),
            (pipeline, f"a whole diffusers pipeline: give its transformer, {pipeline}/transformer")):
        assert main(["sample", "--pipeline", pipeline, "--generator", str(generator), "--prompt", "x",
                     "--teacher-steps", "0", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"adm-megatron sample: --generator {generator}: {hint}"
        assert not out.exists()


def test_mp4_without_ffmpeg_is_refused_before_anything_is_rendered(tmp_path, world_of_one, capsys, monkeypatch):
    """Where imageio-ffmpeg is missing (a GPU machine's environment put together by hand), mp4 failed
    in diffusers' exporter after the whole render; now one line first, and gif still works."""
    import sys

    from adm_megatron.cli import main
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.train.export import export_generator

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    model = build_model_from_hf(f"{pipeline}/transformer")
    generator = export_generator(model, model.arch, str(tmp_path / "generator"))
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    out = tmp_path / "samples"
    args = ["sample", "--pipeline", pipeline, "--generator", generator, "--prompt", "x", "--steps", "1",
            "--teacher-steps", "0", "--out", str(out)]
    assert main(args) == 2  # mp4, the video default
    err = capsys.readouterr().err.strip()
    assert err.startswith("adm-megatron sample: --format mp4: no ffmpeg to write mp4 with (") and \
        err.endswith("install imageio-ffmpeg, or use --format gif or png"), err
    assert not out.exists()
    assert main([*args, "--format", "gif"]) == 0
    assert (out / "generator" / "sample-000.gif").is_file()


@pytest.mark.parametrize("base", ["generator_init", "teacher"])
def test_lora_adapters_are_refused_on_a_base_whose_weights_changed(base, tmp_path, world_of_one, capsys):
    """A LoRA directory's adapters sit on a transformer read from disk when sampled (the run's
    ``model.generator_init``, or its teacher); a run records that transformer's weight fingerprint
    (``distillation.json``'s ``weights_fingerprints``), so a base replaced since -- a generator_init
    directory re-exported, a teacher snapshot updated -- is refused in one line before anything
    renders, instead of sampling the adapters on another model."""
    from safetensors.torch import load_file, save_file

    from adm_megatron.cli import main
    from adm_megatron.models.diffusers_files import transformer_fingerprint, weight_files

    def record(pipe, moved):
        teacher = moved if base == "teacher" else pipe
        return {"generator_steps": 2, "teacher": teacher, "pipeline": pipe if base == "teacher" else None,
                "generator_init": moved if base == "generator_init" else None,
                "weights_fingerprints": {"teacher": transformer_fingerprint(
                    moved if base == "teacher" else os.path.join(pipe, "transformer")), "teacher_kind": "diffusers",
                    "generator_init": transformer_fingerprint(moved) if base == "generator_init" else None}}

    pipeline, moved, _ = _lora_on_a_moved_base(tmp_path, "base", record)
    lora = str(tmp_path / "generator_lora")
    assert main(["sample", "--pipeline", pipeline, "--generator", lora, "--prompt", "x", "--format", "png",
                 "--teacher-steps", "0", "--out", str(tmp_path / "before")]) == 0  # the same base: it samples
    (file,) = weight_files(moved)
    weights = load_file(file)
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1e-3}, file)  # the base re-exported after more training
    capsys.readouterr()
    assert main(["sample", "--pipeline", pipeline, "--generator", lora, "--prompt", "x", "--teacher-steps", "0",
                 "--out", str(tmp_path / "after")]) == 2
    err = capsys.readouterr().err.strip()
    what = "the teacher" if base == "teacher" else f"model.generator_init={moved}"
    assert err.startswith(f"adm-megatron sample: --generator {lora}: its adapters were trained on {what} of "
                          "fingerprint ") and "\n" not in err, err
    assert err.endswith(f"(distillation.json), {moved} now has {transformer_fingerprint(moved)[:12]} (its weight "
                        "files changed since); sample the run's merged generator/ instead"), err
    assert not (tmp_path / "after").exists()


def test_lora_adapters_sampled_with_another_pipeline_are_refused_naming_where_they_were_trained(
        tmp_path, world_of_one, capsys):
    """Another pipeline given to sample with (another teacher): the refusal said its weight files had
    changed since, which they had not; it says that the transformer is not the one, and where that was."""
    from adm_megatron.cli import main
    from adm_megatron.models.diffusers_files import transformer_fingerprint

    def record(pipe, _moved):
        return {"generator_steps": 2, "teacher": pipe, "pipeline": None, "generator_init": None,
                "weights_fingerprints": {"teacher": transformer_fingerprint(os.path.join(pipe, "transformer")),
                                         "teacher_kind": "diffusers", "generator_init": None}}

    pipeline, _, _ = _lora_on_a_moved_base(tmp_path, "base", record)
    other = build_tiny_pipeline(str(tmp_path / "other"), seed=1)
    lora = str(tmp_path / "generator_lora")
    capsys.readouterr()
    assert main(["sample", "--pipeline", other, "--generator", lora, "--prompt", "x", "--teacher-steps", "0",
                 "--out", str(tmp_path / "s")]) == 2
    fingerprint = transformer_fingerprint(os.path.join(pipeline, "transformer"))[:12]
    assert capsys.readouterr().err.strip() == (
        f"adm-megatron sample: --generator {lora}: its adapters were trained on the teacher of fingerprint "
        f"{fingerprint} (distillation.json), not on {other}/transformer "
        f"({transformer_fingerprint(os.path.join(other, 'transformer'))[:12]}), which is not where it was "
        f"({pipeline}): sample with that pipeline, or the run's merged generator/")
    assert not (tmp_path / "s").exists()
