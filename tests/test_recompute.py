"""Activation recompute per network and phase (``model.recompute``): one ADM iteration (fp64) with
the generator on ``full``, the fake score on ``selective`` in the generator phase only and the
teacher on ``full`` in the generator phase only gives the same losses and weights as without
recompute, and each network recomputes exactly where its setting says: with ``full`` its blocks run
again in backward, with ``selective`` only its core attention does, elsewhere nothing runs twice
(counted per network and phase against the run without recompute). The old boolean
``model.recompute`` still sets every network."""

from __future__ import annotations

import collections

import pytest
import torch

COMMON = [
    "model.dtype=fp64",
    "data.num_prompts=4", "data.frames=2", "data.height=4", "data.width=4", "data.batch_size=2",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    "train.max_iterations=1", "train.num_samples=0", "train.export=false",
    "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]
RECOMPUTE = ["model.recompute.generator=full", "model.recompute.fake_score=generator:selective",
             "model.recompute.teacher=generator:full"]
EXPECTED = {("generator", "generator"): "full", ("fake_score", "generator"): "selective",
            ("teacher", "generator"): "full"}


def _run(pipeline_dir: str, output_dir: str, overrides: list[str], monkeypatch):
    from adm_megatron.config import load_config
    from adm_megatron.models.cogvideox_layer import CogVideoXLayer
    from adm_megatron.models.core_attention import SDPACoreAttention
    from adm_megatron.train.trainer import Trainer

    owner, phase = {}, [None]
    calls = collections.Counter()  # (network, phase, "block" | "core") -> calls

    def counting(cls, kind):
        plain = cls.forward

        def forward(self, *args, **kwargs):
            calls[(owner.get(id(self)), phase[0], kind)] += 1
            return plain(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", forward)

    counting(CogVideoXLayer, "block")  # before the trainer is built: its core-attention wrappers bind these
    counting(SDPACoreAttention, "core")
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON, *overrides])
    trainer = Trainer(config)
    for name, model in trainer.recompute.models.items():
        owner.update({id(m): name for m in model.modules()})
    switch = trainer.recompute.before_phase

    def before_phase(name, trained=()):
        phase[0] = name
        switch(name, trained)
    trainer.phases.before_phase = tuple(before_phase if f == switch else f for f in trainer.phases.before_phase)
    losses = {k: v for k, v in trainer.train_iteration(0).items() if k.endswith("/loss")}
    weights = {f"{p}.{n}": w.detach().clone() for p, net in trainer.trainable.items()
               for n, w in net.module.named_parameters()}
    monkeypatch.undo()
    return losses, weights, calls, trainer


def test_recompute_per_network_and_phase_changes_nothing_but_what_runs_twice(tmp_path, world_of_one, monkeypatch):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    ref_losses, ref_weights, ref_calls, _ = _run(pipeline_dir, str(tmp_path / "none"), [], monkeypatch)
    losses, weights, calls, trainer = _run(pipeline_dir, str(tmp_path / "some"), RECOMPUTE, monkeypatch)
    # the last phase (discriminator): the generator full everywhere, the fake score only in the generator phase
    assert (trainer.generator.config.recompute_granularity, trainer.fake_score.config.recompute_granularity) == ("full", None)
    for key, want in ref_losses.items():
        assert abs(losses[key] - want) <= 1e-12 * max(1.0, abs(want)), key
    for name, want in ref_weights.items():
        assert torch.allclose(weights[name], want, rtol=1e-12, atol=1e-15), name
    seen = {(n, p) for n, p, _ in ref_calls} | {(n, p) for n, p, _ in calls}
    assert {k for k in EXPECTED} <= seen
    for network, phase in seen:
        extra = {kind: calls[(network, phase, kind)] - ref_calls[(network, phase, kind)] for kind in ("block", "core")}
        mode = EXPECTED.get((network, phase), "none")
        if mode == "full":
            assert extra["block"] > 0 and extra["core"] == extra["block"], (network, phase, extra)
        elif mode == "selective":
            assert extra["block"] == 0 and extra["core"] > 0, (network, phase, extra)
        else:
            assert extra == {"block": 0, "core": 0}, (network, phase, extra)


@pytest.mark.parametrize("value, expected", [("true", "full"), ("false", "none"), ("selective", "selective")])
def test_the_old_boolean_and_one_mode_set_every_network(value, expected):
    from adm_megatron.config import load_config

    recompute = load_config(None, ["model.teacher=x", f"model.recompute={value}"]).model.recompute
    for network in ("teacher", "fake_score", "generator"):
        for phase in ("fake_score", "generator", "discriminator"):
            assert recompute.mode(network, phase) == expected


def test_selective_recompute_finds_any_familys_core_attention_and_refuses_a_model_without_one(monkeypatch):
    """The switch knows no family's attention class: a module of a new family with a ``core_attention``
    submodule gets it recomputed under ``selective``; a model with none is refused in one line rather
    than silently recomputing nothing."""
    from megatron.core import tensor_parallel

    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.recompute import RecomputeSwitch

    class Core(torch.nn.Module):  # softmax(QK^T)V of a family the switch has never heard of
        def forward(self, q, k, v):
            return q

    class NewFamilyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core_attention = Core()

        def forward(self, x):
            return self.core_attention(x, x, x)

    class Model(torch.nn.Module):
        def __init__(self, attention: bool):
            super().__init__()
            self.config = type("TransformerConfig", (), {"recompute_granularity": None})()
            self.blocks = torch.nn.ModuleList([NewFamilyAttention() if attention else torch.nn.Linear(2, 2)])

    checkpointed = []
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda fn, _distribute, *args: checkpointed.append(fn) or args[0])
    recompute = load_config(None, ["model.teacher=x", "model.recompute.generator=selective"]).model.recompute
    model = Model(attention=True)
    RecomputeSwitch({"generator": model}, recompute).before_phase("generator")
    assert model.config.recompute_granularity == "selective"
    with torch.enable_grad():
        model.blocks[0](torch.ones(2, requires_grad=True))
    assert len(checkpointed) == 1
    with pytest.raises(ConfigError, match=r"^model.recompute.generator='selective': the generator's model \(Model\) "
                                          r"has no core attention"):
        RecomputeSwitch({"generator": Model(attention=False)}, recompute)
    RecomputeSwitch({"generator": Model(attention=False)},  # full needs no core attention
                    load_config(None, ["model.teacher=x", "model.recompute.generator=full"]).model.recompute)
