"""ADM as Algorithm 1 writes it, and an adversarial game a user can watch:

- the fake-score phase and the generator phase start from independent noises (z, ẑ);
- the generator's gradient reaches x̂0 through x_t directly *and* through the fake score's ODE step
  (checked against the analytic split into both terms, fp64), and the ablation switch that cuts the
  second path leaves only the first;
- the frozen-discriminator ablation never updates the heads but still reports their statistics;
- the discriminator's paired statistics (hand values), their place in the run's metrics and
  progress bar, and the warning for a discriminator that stays at chance.
"""

from __future__ import annotations

import json
import math
import logging
import re

import pytest
import torch

from adm_megatron.algorithms.discriminator_health import discriminator_health
from adm_megatron.algorithms.losses import hinge_d_loss, hinge_g_loss
from adm_megatron.config import load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.train.discriminator_monitor import DiscriminatorMonitor

BASE = [
    "data.num_prompts=4", "data.batch_size=2", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    "train.max_iterations=2", "train.num_samples=0", "train.export=false",
    "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


def _trainer(pipeline_dir, tmp_path, *extra):
    from adm_megatron.train.trainer import Trainer

    return Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path}", *BASE, *extra]))


def test_the_two_phases_start_from_independent_noises(pipeline_dir, tmp_path, world_of_one):
    trainer = _trainer(pipeline_dir, tmp_path, "distill.generator_steps=1")
    alg, batch = trainer.algorithm, trainer.batches(0)[0]
    first_inputs = []
    generator = alg.nets.generator

    def recording(x, t, text):
        first_inputs.append(x.detach().clone())
        return generator(x, t, text)

    alg.nets.generator = recording
    with torch.no_grad():
        alg.fake_score_loss(batch, trainer.draws(0, "fake_score").micro(0))
        first_fake = first_inputs[0]
        first_inputs.clear()
        x0_generator_phase = alg.generator_x0(batch, trainer.draws(0, "generator").micro(0))
    first_generator = first_inputs[0]
    assert torch.equal(first_fake, batch.fake_noise) and torch.equal(first_generator, batch.generator_noise)
    assert not torch.allclose(batch.fake_noise, batch.generator_noise)
    # with N = 1 a shared noise would make the generator's x̂0 the very sample the fake score learnt on
    with torch.no_grad():
        x0_fake_phase = alg.sample_generator(batch.fake_noise, batch.text)
    assert not torch.allclose(x0_fake_phase, x0_generator_phase)
    # each is its own seeded stream: the same iteration draws the same noises again
    again = trainer.batches(0)[0]
    assert torch.equal(again.fake_noise, batch.fake_noise) and torch.equal(again.generator_noise, batch.generator_noise)


def _generator_gradient_and_split(trainer):
    """dL_G/dx̂0 from the algorithm, and the analytic split of dL_G/dx_t recomputed by hand:
    (direct term with the fake output held fixed, total with the fake score's Jacobian)."""
    alg, batch = trainer.algorithm, trainer.batches(0)[0]
    captured = {}
    diffuse = alg.diffuse

    def recording_diffuse(*args, **kwargs):
        captured["x_t"], captured["t"], _ = out = diffuse(*args, **kwargs)
        return out

    alg.diffuse = recording_diffuse
    x0 = torch.randn_like(batch.generator_noise).requires_grad_()
    pair = alg.ode_pair(x0, batch, trainer.draws(0, "generator").micro(0))
    loss = hinge_g_loss(alg.discriminate(pair.x_fake, pair.t_prev, batch))
    (grad_x0,) = torch.autograd.grad(loss, x0)

    t, t_prev = captured["t"], pair.t_prev
    u = captured["x_t"].detach().requires_grad_()
    fake_out = alg.nets.fake_score(u, alg.schedule.model_timestep(t), batch.text)

    def loss_of(out):
        return hinge_g_loss(alg.discriminate(alg.schedule.ode_step(u, out, t, t_prev), t_prev, batch))

    (total,) = torch.autograd.grad(loss_of(fake_out), u)
    (direct,) = torch.autograd.grad(loss_of(fake_out.detach()), u)
    # x_t = a_t x0 + s_t noise: dL/dx0 = a_t dL/dx_t
    a_t = alg.schedule.add_noise(torch.ones_like(x0), torch.zeros_like(x0), t)
    return grad_x0, a_t * total, a_t * direct


def test_generator_gradient_passes_through_the_fake_scores_ode_step(pipeline_dir, tmp_path, world_of_one):
    trainer = _trainer(pipeline_dir, tmp_path, "model.dtype=fp64")
    grad, total, direct = _generator_gradient_and_split(trainer)
    jacobian_term = total - direct
    assert jacobian_term.norm() > 0.05 * total.norm()  # the path is not negligible here
    torch.testing.assert_close(grad, total, rtol=1e-9, atol=1e-12)

    ablated = _trainer(pipeline_dir, tmp_path / "ablated", "model.dtype=fp64", "distill.fake_score_grad=false")
    grad, total, direct = _generator_gradient_and_split(ablated)
    torch.testing.assert_close(grad, direct, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grad, total)


def test_frozen_discriminator_ablation_never_updates_the_heads_but_reports_them(pipeline_dir, tmp_path,
                                                                                world_of_one):
    trainer = _trainer(pipeline_dir, tmp_path, "distill.train_discriminator=false")
    heads = {n: p.detach().clone() for n, p in trainer.heads.named_parameters()}
    for iteration in range(2):
        metrics = trainer.train_iteration(iteration)
    assert all(torch.equal(heads[n], p) for n, p in trainer.heads.named_parameters())
    assert "discriminator/grad_norm" not in metrics
    for key in ("discriminator/loss", "discriminator/paired_accuracy", "discriminator/paired_margin"):
        assert key in metrics


def test_paired_statistics_hand_values():
    real = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    fake = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = hinge_d_loss(real, fake)
    stats = discriminator_health(real, fake, loss, hinge_d_loss)
    # diffs: head 0 (1, -0.5), head 1 (0 tie, 1)
    assert stats["discriminator/paired_margin/h0"] == pytest.approx(0.25)
    assert stats["discriminator/paired_margin/h1"] == pytest.approx(0.5)
    assert stats["discriminator/paired_margin"] == pytest.approx(0.375)
    assert stats["discriminator/paired_accuracy/h0"] == pytest.approx(0.5)
    assert stats["discriminator/paired_accuracy/h1"] == pytest.approx(0.75)  # a tie counts one half
    assert stats["discriminator/paired_accuracy"] == pytest.approx(0.625)
    # chance: zero logits give a hinge loss of 2 per head, 4 for two summed heads
    assert stats["discriminator/loss_vs_chance"] == pytest.approx(loss.item() / 4)


def test_dead_discriminator_monitor_averages_over_its_window_and_warns_once():
    monitor = DiscriminatorMonitor(window=3, threshold=0.55)
    assert [monitor.update(a) for a in (0.9, 0.5, 0.5)] == [False, False, False]  # mean 0.63
    assert monitor.update(0.5) is True  # the last three average 0.5
    assert monitor.update(0.5) is False  # once per run
    assert DiscriminatorMonitor(window=0, threshold=1.0).update(0.0) is False  # disabled


def test_nan_logits_give_a_nan_accuracy_that_the_monitor_does_not_count():
    """A discriminator update skipped for NaN logits (train.nan_policy=skip) reported a paired
    accuracy of 0.0 (NaN compares false both ways) and the dead-discriminator monitor averaged it in."""
    real = torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]])
    fake = torch.zeros(2, 2)
    stats = discriminator_health(real, fake, hinge_d_loss(real, fake), hinge_d_loss)
    assert math.isnan(stats["discriminator/paired_accuracy/h0"])
    assert stats["discriminator/paired_accuracy/h1"] == 1.0
    assert math.isnan(stats["discriminator/paired_accuracy"])
    monitor = DiscriminatorMonitor(window=2, threshold=0.55)
    assert [monitor.update(a) for a in (0.9, float("nan"), 0.9)] == [False, False, False]
    assert list(monitor.recent) == [0.9, 0.9]


def test_run_reports_discriminator_health_in_metrics_and_warns_when_dead(pipeline_dir, tmp_path, world_of_one,
                                                                         caplog):
    trainer = _trainer(pipeline_dir, tmp_path, "logging.dead_discriminator_window=2",
                       "logging.dead_discriminator_accuracy=1.0")  # every accuracy counts as dead
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "discriminator looks dead" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("iteration 1:")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for key in ("paired_margin", "paired_accuracy", "loss_vs_chance", "paired_margin/h0",
                "paired_accuracy/h1"):
        assert f"discriminator/{key}" in rows[-1], key
    assert 0.0 <= rows[-1]["discriminator/paired_accuracy"] <= 1.0
    quiet = _trainer(pipeline_dir, tmp_path / "quiet", "logging.dead_discriminator_window=2",
                     "logging.dead_discriminator_accuracy=0.0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adm_megatron"):
        quiet.fit()
    assert not [r for r in caplog.records if "discriminator looks dead" in r.getMessage()]


def test_progress_bar_names_the_method_and_shows_the_discriminators_paired_accuracy_and_margin(tmp_path):
    from adm_megatron.train.run_log import RunLogger

    log = RunLogger(str(tmp_path), {"distill": {"method": "dmd2"}}, 2, 0, True, wandb_mode="disabled", progress=True)
    log.log({"iteration": 0, "generator/loss": 0.5, "discriminator/loss": 5.9,
             "discriminator/paired_accuracy": 0.75, "discriminator/paired_margin": 0.125})
    postfix, label = log.bar.postfix, log.bar.desc
    log.close()
    assert "D_acc=0.75" in postfix and "D_margin=0.125" in postfix and "gene=0.5" in postfix
    assert label == "dmd2"  # the run's method, not always "adm"


def test_image_samples_go_to_wandb_as_a_list_of_one_size_and_their_grid_apart(tmp_path):
    """wandb warned 'Images sizes do not match' at the end of every SD3 run: the grid of all the
    images (another size) went into the same list as the images."""
    from PIL import Image

    from adm_megatron.train.run_log import RunLogger

    paths = []
    for name, size in (("sample-000.png", (8, 8)), ("sample-001.png", (8, 8)), ("grid.png", (16, 8))):
        Image.new("RGB", size).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    logged = []
    log = RunLogger(str(tmp_path / "run"), {}, 2, 0, True, wandb_mode="disabled", progress=False)
    log.wandb = type("Run", (), {"log": lambda self, values, step: logged.append((values, step))})()
    log.media(3, paths)
    (values, step), = logged
    assert step == 3 and len(values["samples"]) == 2 and {im.image.size for im in values["samples"]} == {(8, 8)}
    assert values["samples_grid"].image.size == (16, 8)


def test_log_lines_go_above_the_progress_bar(tmp_path, capsys):
    """An INFO line logged while the bar was shown was glued to the end of the bar's line in the log."""
    import sys

    from adm_megatron.train.run_log import RunLogger

    handler = logging.StreamHandler(sys.stderr)  # as the CLI's basicConfig puts on the root logger
    handler.setFormatter(logging.Formatter("[test] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log = RunLogger(str(tmp_path), {}, 2, 0, True, wandb_mode="disabled", progress=True)
        log.log({"iteration": 0, "generator/loss": 0.5})
        logging.getLogger("adm_megatron").warning("a line of its own")
        log.close()
        logging.getLogger("adm_megatron").warning("after the bar")
    finally:
        root.removeHandler(handler)
    pieces = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "[test] a line of its own" in pieces and "[test] after the bar" in pieces
