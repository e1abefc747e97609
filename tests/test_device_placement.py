"""Every tensor an ADM / DMD / DMD2 / ADP phase makes lives on the networks' device. The CPU suite cannot see a
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


def _real_pairs(pipeline: str, tmp_path, family: str) -> list[str]:
    """DMD2 and ADP read teacher ODE pairs: four, collected with the tiny teacher."""
    from adm_megatron.cli import main
    from adm_megatron.parallel import destroy_parallel

    (tmp_path / "run.yaml").write_text(f"model: {{teacher: {pipeline}}}\n")
    assert main(["collect-ode", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "pairs"),
                 "--num-pairs", "4", "--steps", "2", "--no-progress", "data.num_prompts=4", *SIZES[family]]) == 0
    destroy_parallel()
    return [f"data.real_path={tmp_path / 'pairs'}"]


@pytest.mark.parametrize("family,method", [("cogvideox", "adm"), ("cogvideox", "dmd"), ("cogvideox", "dmd2"),
                                           ("cogvideox", "adp"), ("sd3", "adm")])
def test_every_phase_keeps_its_tensors_on_the_networks_device(family, method, tmp_path, world_of_one, monkeypatch):
    from adm_megatron.parallel import initialize_parallel
    from adm_megatron.train.trainer import Trainer

    build = build_tiny_pipeline if family == "cogvideox" else build_tiny_sd3_pipeline
    pipeline = build(str(tmp_path / "pipe"), seed=0)
    extra = []
    if method in ("dmd2", "adp"):
        extra = _real_pairs(pipeline, tmp_path, family)
        initialize_parallel(tensor_parallel=1, context_parallel=1, seed=1234)
    if method == "adp":  # the latent discriminator only (no pixel branch: VAE decode and vision encoder)
        extra += ["distill.generator_steps=1", "distill.pixel_weight=0"]
    trainer = Trainer(load_config(None, [f"model.teacher={pipeline}", f"output_dir={tmp_path / 'run'}", *BASE,
                                         *SIZES[family], f"distill.method={method}", *extra]))
    alg, nets = trainer.algorithm, trainer.algorithm.nets
    for net in (nets.generator, nets.fake_score, nets.teacher, nets.heads):
        if net is not None:
            getattr(net, "module", net).to("meta")
    assert all(p.is_meta for p in getattr(nets.generator, "module", nets.generator).parameters())
    batch = _on_meta(trainer.batches(0)[0])
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 0.0 if self.is_meta else item(self))

    losses = [alg.fake_score_loss(batch, trainer.draws(0, "fake_score").micro(0))[0]] if alg.fake_phase_trains else []
    loss, _, pair = alg.generator_loss(batch, trainer.draws(0, "generator").micro(0))
    losses.append(loss)
    if alg.discriminator_phase:
        losses.append(alg.discriminator_loss(pair, batch)[0])
    phases = {"adm": 3, "dmd": 2, "dmd2": 2, "adp": 2}[method]
    assert [t.device.type for t in losses] == ["meta"] * phases
