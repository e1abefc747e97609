"""``adm-megatron sample`` refuses, in one line and before any pipeline is loaded or --out written, a
step count the pipeline's scheduler cannot take (diffusers' CogVideoX schedulers: at most
``num_train_timesteps``, said by diffusers only once the pipeline was loaded) and an SD3 size past
its transformer's cropped position embedding (``pos_embed_max_size``: it rendered for minutes before)."""

from __future__ import annotations

import json
import os

import pytest

from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"cogvideox": build_tiny_pipeline(str(root / "cogvideox"), seed=0),
            "sd3": build_tiny_sd3_pipeline(str(root / "sd3"), seed=0)}


def _refusal(pipeline: str, out, *extra: str, capsys) -> str:
    from adm_megatron.cli import main

    capsys.readouterr()
    assert main(["sample", "--pipeline", pipeline, "--generator", f"{pipeline}/transformer", "--prompt", "x",
                 *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err and not out.exists()
    ours = [line for line in err.splitlines() if line.startswith("adm-megatron sample:")]
    assert len(ours) == 1, err
    return ours[0]


def test_a_step_count_past_the_schedulers_timesteps_is_refused_before_loading(pipelines, tmp_path, capsys):
    pipeline = pipelines["cogvideox"]
    config = os.path.join(pipeline, "scheduler", "scheduler_config.json")
    with open(config) as f:
        scheduler = json.load(f)
    limit = scheduler["num_train_timesteps"]
    said = (f"expected at most {limit}, the timesteps of the pipeline's {scheduler['_class_name']} "
            f"(num_train_timesteps in {config})")
    assert _refusal(pipeline, tmp_path / "out", "--steps", "100000", "--teacher-steps", "0", capsys=capsys) == (
        f"adm-megatron sample: --steps 100000: {said}")
    assert _refusal(pipeline, tmp_path / "out", "--steps", "1", "--teacher-steps", str(limit + 1), capsys=capsys) == (
        f"adm-megatron sample: --teacher-steps {limit + 1}: {said}")


def test_flow_matching_takes_any_step_count_and_sd3_a_size_its_position_embedding_covers(pipelines, tmp_path,
                                                                                        capsys):
    from adm_megatron.families import get_family
    from adm_megatron.sampling import SampleRun, _check_step_counts

    pipeline = pipelines["sd3"]
    _check_step_counts(pipeline, get_family("sd3"), [SampleRun("generator", None, 5000, 1.0)])
    with open(os.path.join(pipeline, "transformer", "config.json")) as f:
        patches = json.load(f)["pos_embed_max_size"]
    with open(os.path.join(pipeline, "vae", "config.json")) as f:
        side = 2 ** (len(json.load(f)["block_out_channels"]) - 1) * 2  # pixels per latent x the patch, 2
    assert _refusal(pipeline, tmp_path / "out", "--steps", "1", "--teacher-steps", "0", "--width", str(side),
                    "--height", str((patches + 1) * side), capsys=capsys) == (
        f"adm-megatron sample: --height {(patches + 1) * side}: expected at most {patches * side} (the transformer's "
        f"position embedding covers pos_embed_max_size={patches} patches of {side} pixels on a side)")
