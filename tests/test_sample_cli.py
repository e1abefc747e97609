"""``adm-megatron sample`` renders an exported tiny generator and the teacher through the real
``CogVideoXPipeline`` (prompts encoded by the pipeline's T5), writes the files and the seconds per
sample, and names bad input in one line."""

from __future__ import annotations

import json

import numpy as np

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
    assert capsys.readouterr().err.strip() == "adm-megatron sample: generator steps=0: expected >= 1"
