"""Every tensor an ADM / DMD phase makes lives on the networks' device. The CPU suite cannot see a
tensor left on the CPU (everything is on the CPU), and the first GPU run failed on one (the generator
rollout handed its CPU timesteps to the model). The meta device stands in for a GPU here: like CUDA
it refuses an op that mixes it with a CPU tensor (a 0-dim CPU scalar aside), and it runs the real
networks without values. So each phase's losses are computed with the real networks moved to meta
and the batch on meta; a metric's ``.item()`` (which needs values) reads 0 there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adm_megatron.config import load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.data.tiny_sd3_pipeline import build_tiny_sd3_pipeline

BASE = [
    "data.num_prompts=4", "data.batch_size=2", "distill.generator_steps=2", "distill.delta_t=100",
    "distill.head_every=1", "distill.head_hidden=16", "train.max_iterations=2", "train.num_samples=0",
    "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false",
]
SIZES = {"cogvideox": ["data.frames=2", "data.height=4", "data.width=4"],
         "sd3": ["data.frames=1", "data.height=16", "data.width=16"]}


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _on_meta(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


@pytest.mark.parametrize("family,method", [("cogvideox", "adm"), ("cogvideox", "dmd"), ("sd3", "adm")])
def test_every_phase_keeps_its_tensors_on_the_networks_device(family, method, tmp_path, world_of_one, monkeypatch):
    from adm_megatron.train.trainer import Trainer

    build = build_tiny_pipeline if family == "cogvideox" else build_tiny_sd3_pipeline
    pipeline = build(str(tmp_path / "pipe"), seed=0)
    trainer = Trainer(load_config(None, [f"model.teacher={pipeline}", f"output_dir={tmp_path / 'run'}", *BASE,
                                         *SIZES[family], f"distill.method={method}"]))
    alg, nets = trainer.algorithm, trainer.algorithm.nets
    for net in (nets.generator, nets.fake_score, nets.teacher, nets.heads):
        if net is not None:
            getattr(net, "module", net).to("meta")
    assert all(p.is_meta for p in getattr(nets.generator, "module", nets.generator).parameters())
    batch = _on_meta(trainer.batches(0)[0])
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 0.0 if self.is_meta else item(self))

    losses = [alg.fake_score_loss(batch, trainer.draws(0, "fake_score").micro(0))[0]]
    loss, _, pair = alg.generator_loss(batch, trainer.draws(0, "generator").micro(0))
    losses.append(loss)
    if alg.discriminator_phase:
        losses.append(alg.discriminator_loss(pair, batch)[0])
    assert [t.device.type for t in losses] == ["meta"] * (3 if method == "adm" else 2)
