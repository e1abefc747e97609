"""Exact resume for every distillation method, not only ADM (tests/test_resume.py kills real ADM
processes): a DMD, DMD2 or ADP run (fp64, EMA, TTUR for the methods with a fake score) resumed from
its iteration-2 checkpoint into a new output directory starts at iteration 2, runs only
iterations 2 and 3, and logs exactly the losses of the uninterrupted run's iterations 2 and 3; its
exported generator equals the uninterrupted run's bit for bit. Each method's own state (DMD2's
classifier heads, ADP's latent heads, the fake score where there is one) is what the checkpoint
must carry for this to hold."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

COMMON = [
    "model.dtype=fp64", "data.num_prompts=4", "data.batch_size=2", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=1", "distill.head_every=1", "distill.head_hidden=16",
    "train.max_iterations=4", "train.save_every=2", "train.keep_checkpoints=2", "train.num_samples=0",
    "train.ema_decay=0.5", "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
    "optim.generator.decay_style=cosine",
]
METHODS = {
    "dmd": ["distill.method=dmd", "distill.ttur=2"],
    "dmd2": ["distill.method=dmd2", "distill.ttur=2"],
    "adp": ["distill.method=adp", "distill.pixel_weight=0", "distill.latent_weight=1"],
}


def _fit(pipeline_dir: str, pairs: str, out: str, method: str, *extra: str):
    from adm_megatron.config import load_config
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    trainer = Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"data.real_path={pairs}",
                                         f"output_dir={out}", *COMMON, *METHODS[method], *extra]))
    start = trainer.start_iteration
    result = trainer.fit()
    destroy_parallel()
    return start, result


def _losses(out: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("/loss")} for r in rows}


def _generator(out: str) -> dict[str, torch.Tensor]:
    return load_file(glob.glob(os.path.join(out, "generator", "*.safetensors"))[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_resumed_run_of_each_method_does_only_the_rest_and_matches(method, cogvideox_pipeline,
                                                                     cogvideox_ode_pairs, tmp_path, world_of_one):
    whole = str(tmp_path / "whole")
    _fit(cogvideox_pipeline, cogvideox_ode_pairs, whole, method)
    checkpoint = os.path.join(whole, "checkpoints", "iter_0000002")
    assert os.path.isdir(checkpoint)
    resumed = str(tmp_path / "resumed")
    start, result = _fit(cogvideox_pipeline, cogvideox_ode_pairs, resumed, method, f"train.resume={checkpoint}")
    assert start == 2 and result.trained == 2
    want, got = _losses(whole), _losses(resumed)
    assert sorted(got) == [2, 3] and all(got[i] for i in got)
    assert got == {i: want[i] for i in (2, 3)}
    reference = _generator(whole)
    for name, tensor in _generator(resumed).items():
        assert torch.equal(tensor, reference[name]), name

