"""ADP (algorithms/adp.py) on tiny tensors, without a trainer:

- the generator-time warp is s = 1 - u^3 and lands on the schedule's timestep for s;
- the rectified-flow reading is exact for both schedule kinds: the input is (alpha + sigma) x the
  RF interpolation (exactly (1 - s) x_0 + s x_T for flow), and the schedule's velocity target of the
  pair is read back as x0_hat = x_0 and RF velocity x_T - x_0 (fp64, 1e-12);
- at s = 1 ADP's x0 reading of the generator equals diffusers' own 1-step sampling loop (the
  exported 1-step generator samples as it was trained);
- the generator and discriminator losses equal the hinge formulas written out by hand, with the
  λ1 / λ2 weights, on stand-in networks whose logits are simple functions of their input;
- ``pure_noise_share`` puts exactly the drawn share at the 1-step input (x_T) and leaves the rest
  on the warp; ``renoise`` re-noises the two sides independently, with one draw, or with x_T;
  both reach the algorithm from the config and are refused outside ADP.
"""

from __future__ import annotations

import pytest
import torch

from adm_megatron.algorithms.adp import ADP, warp_rf_time
from adm_megatron.algorithms.base import PhaseBatch, RealBatch
from adm_megatron.algorithms.networks import Networks
from adm_megatron.algorithms.randomness import PhaseDraws
from adm_megatron.data.batch_layout import BatchLayout
from adm_megatron.diffusion.schedules import FlowMatchSchedule, VPVPredSchedule
from test_diffusion_rollout import TinyModel, diffusers_loop, flow_pair, vp_pair

SCHEDULES = pytest.mark.parametrize("schedule", [VPVPredSchedule(3.0), FlowMatchSchedule(3.0)], ids=["vp", "flow"])
EXACT = dict(rtol=1e-12, atol=1e-12)
B = 4


def _rng(seed=0):
    return PhaseDraws(torch.Generator().manual_seed(seed), BatchLayout(B)).micro(0)


def _pair(seed=1, shape=(B, 2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_warp_formula():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(warp_rf_time(u), 1 - u**3)
    assert warp_rf_time(torch.tensor([0.5])).item() == 0.875


@SCHEDULES
def test_generator_time_is_the_warped_uniform_draw(schedule):
    alg = ADP(_stub_networks(pixel=False), schedule, 1, (1.0, 1.0), pixel_weight=0.0, latent_weight=1.0)
    x_T, x0 = _pair()
    _, t = alg.generator_input(x_T, x0, _rng(3))
    u = _rng(3).rand("cpu")
    assert torch.equal(t, schedule.timestep_at_rf_time(1 - u**3))
    if isinstance(schedule, FlowMatchSchedule):
        assert torch.allclose(t.double(), (1 - u**3) * 1000, rtol=1e-6)
    else:  # the grid timestep whose RF time is nearest
        grid = schedule.rf_time(torch.arange(1000))
        assert torch.equal(t, (grid[None, :] - (1 - u**3)[:, None]).abs().argmin(dim=1))


@SCHEDULES
def test_pure_noise_share_puts_that_share_at_the_one_step_input(schedule):
    """``pure_noise_share`` p: a second uniform draw puts a sample at s = 1 when it is below p (its
    input is then x_T itself, at the 1-step sampler's timestep); the others keep the warp's draw.
    p = 0 makes no extra draw, so earlier runs draw what they drew."""
    x_T, x0 = _pair(shape=(64, 2, 3, 4, 4))
    terminal = schedule.timestep_at_rf_time(torch.ones(1, dtype=torch.float64))
    assert terminal.item() == schedule.inference_timesteps(1)[0].item()
    counts = {}
    for share in (0.0, 0.5, 1.0):
        alg = ADP(_stub_networks(pixel=False), schedule, 1, (1.0, 1.0), pixel_weight=0.0, latent_weight=1.0,
                  pure_noise_share=share)
        draws = PhaseDraws(torch.Generator().manual_seed(5), BatchLayout(64)).micro(0)
        x_t, t = alg.generator_input(x_T, x0, draws)
        replay = PhaseDraws(torch.Generator().manual_seed(5), BatchLayout(64)).micro(0)
        warped = schedule.timestep_at_rf_time(warp_rf_time(replay.rand("cpu")))
        at_one = replay.rand("cpu") < share if share else torch.zeros(64, dtype=torch.bool)
        assert torch.equal(t[at_one], terminal.expand(int(at_one.sum())))
        assert torch.equal(x_t[at_one], x_T[at_one])
        assert torch.equal(t[~at_one], warped[~at_one])
        assert torch.equal(draws.phase.generator.get_state(), replay.phase.generator.get_state())  # no draw beyond these
        counts[share] = int(at_one.sum())
    assert counts[0.0] == 0 and counts[1.0] == 64 and 16 <= counts[0.5] <= 48, counts


@SCHEDULES
def test_rf_reading_is_exact(schedule):
    x_T, x0 = _pair()
    t = schedule.timestep_at_rf_time(torch.tensor([1.0, 0.9, 0.5, 0.05], dtype=torch.float64))
    s = schedule.rf_time(t).view(-1, 1, 1, 1, 1)
    alpha, sigma = (c.view(-1, 1, 1, 1, 1) for c in schedule.coefficients(t))
    x_t = schedule.add_noise(x0, x_T, t)
    assert torch.allclose(x_t, (alpha + sigma) * ((1 - s) * x0 + s * x_T), **EXACT)
    if isinstance(schedule, FlowMatchSchedule):  # the plain RF interpolation, s = t / T
        assert torch.allclose(s.flatten(), t.double() / 1000, **EXACT)
        assert torch.allclose(x_t, (1 - s) * x0 + s * x_T, **EXACT)
    # the schedule's velocity target of the pair is read back as (x_0, x_T): RF velocity x_T - x_0
    v = schedule.target(x0, x_T, t)
    x0_hat, eps_hat = schedule.model_output_to_x0_eps(x_t, v, t)
    assert torch.allclose(x0_hat, x0, **EXACT)
    assert torch.allclose(eps_hat - x0_hat, x_T - x0, **EXACT)
    if isinstance(schedule, FlowMatchSchedule):
        assert torch.allclose(v, x_T - x0, **EXACT)  # the flow model's output is the RF velocity itself
    # s = 1 is pure noise: the first N = 1 inference timestep, input x_T
    assert torch.equal(t[0], schedule.inference_timesteps(1)[0].to(t.dtype))
    assert torch.equal(x_t[0], x_T[0])


@pytest.mark.parametrize("pair", [vp_pair, flow_pair], ids=["vp", "flow"])
def test_one_step_reading_equals_diffusers_one_step_sampler(pair):
    ref, schedule = pair()
    model = TinyModel()
    x_T = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    t = schedule.timestep_at_rf_time(torch.ones(2, dtype=torch.float64))
    x_t = schedule.add_noise(torch.zeros_like(x_T), x_T, t)  # at s = 1 the pair's x_0 has no weight
    x0_hat, _ = schedule.model_output_to_x0_eps(x_t, model(x_t, schedule.model_timestep(t)), t)
    assert (x0_hat - diffusers_loop(ref, model, x_T, 1)).abs().max() <= 1e-6
    assert x0_hat.abs().max() > 0.1


# -- the losses by hand ------------------------------------------------------------------------
class _Teacher:
    """Backbone stand-in: its 'features' of x are [x] (the heads below read them directly)."""

    def features(self, x, t, text, every):
        return [x]


class _Generator:
    def __init__(self):
        self.w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def __call__(self, x, t, text):
        return self.w * x


class _Pixel:
    """Pixel backbone stand-in: two 'layers', each a per-frame map of the latent's frames."""

    def __init__(self):
        self.calls = 0

    def features(self, latents):
        self.calls += 1
        frames = latents.flatten(0, 1)  # [B F, C, H, W]
        return [frames, 2 * frames]


def _heads(features, branch):
    """Logits [N, heads]: latent = 20 x mean of each feature; pixel = -8 x mean + 0.5."""
    scale, shift = (20.0, 0.0) if branch == "latent" else (-8.0, 0.5)
    return torch.stack([scale * f.flatten(1).mean(1) + shift for f in features], dim=1)


def _stub_networks(pixel: bool):
    return Networks(teacher=_Teacher(), fake_score=None, generator=_Generator(), heads=_heads, head_every=1,
                    pixel=_Pixel() if pixel else None)


def _hinge_g(logits):
    return -logits.sum(1).mean()


def _hinge_d(real, fake):
    return torch.clamp(1 - real, min=0).sum(1).mean() + torch.clamp(1 + fake, min=0).sum(1).mean()


@SCHEDULES
@pytest.mark.parametrize("weights", [(0.85, 0.15), (1.0, 0.0)], ids=["latent+pixel", "latent-only"])
def test_losses_equal_the_hand_computed_hinge(schedule, weights):
    lam1, lam2 = weights
    nets = _stub_networks(pixel=lam2 > 0)
    alg = ADP(nets, schedule, 1, (1.0, 1.0), latent_weight=lam1, pixel_weight=lam2)
    x_T, x0 = _pair()
    x_T, x0 = 3 * x_T, 3 * x0  # logits on both sides of the hinges' kinks
    text = torch.zeros(B, 2, 3, dtype=torch.float64)
    batch = PhaseBatch(text=text, negative=text, fake_noise=x_T, generator_noise=x_T,
                       real=RealBatch(x0=x0, text=text, x_T=x_T))
    g_loss, _, pair = alg.generator_loss(batch, _rng(7))
    d_loss, metrics, _ = alg.discriminator_loss(pair, batch)

    # by hand, with the same draws in the same order: u, t', the fake and the real noise
    rng = _rng(7)
    t = schedule.timestep_at_rf_time(1 - rng.rand("cpu") ** 3)
    alpha, sigma = (c.view(-1, 1, 1, 1, 1) for c in schedule.coefficients(t))
    x_t = alpha * x0 + sigma * x_T
    v = nets.generator.w.detach() * x_t
    if isinstance(schedule, FlowMatchSchedule):
        x0_hat = x_t - sigma * v
    else:
        x0_hat = alpha * x_t - sigma * v
    t_disc = rng.randint(0, 1000, "cpu")
    a2, s2 = (c.view(-1, 1, 1, 1, 1) for c in schedule.coefficients(t_disc))
    fake_t = a2 * x0_hat + s2 * rng.randn(x0_hat)
    real_t = a2 * x0 + s2 * rng.randn(x0)
    lat_fake = 20 * fake_t.flatten(1).mean(1, keepdim=True)
    lat_real = 20 * real_t.flatten(1).mean(1, keepdim=True)
    expected_g = lam1 * -lat_fake.mean()
    expected_d = lam1 * (torch.clamp(1 - lat_real, min=0).mean() + torch.clamp(1 + lat_fake, min=0).mean())
    if lam2 > 0:
        def pix(x):  # 2 heads per frame, averaged over each sample's 2 frames
            frames = x.flatten(0, 1).flatten(1).mean(1)
            per_frame = torch.stack([-8 * frames + 0.5, -16 * frames + 0.5], dim=1)
            return per_frame.view(B, 2, 2).mean(1)

        expected_g = expected_g + lam2 * _hinge_g(pix(x0_hat))
        expected_d = expected_d + lam2 * _hinge_d(pix(x0), pix(x0_hat))
        assert nets.pixel.calls == 2  # fake once (generator phase, reused), real once
    assert lat_real.abs().max() > 1 and (lat_real.abs() < 1).any()  # both sides of the kink exercised
    assert torch.allclose(g_loss, expected_g, **EXACT), (g_loss, expected_g)
    assert torch.allclose(d_loss, expected_d, **EXACT), (d_loss, expected_d)
    assert abs(metrics["latent"] - _hinge_d(lat_real, lat_fake).item()) <= 1e-12
    # the generator's gradient reaches its weight through x0_hat
    g_loss.backward()
    assert nets.generator.w.grad is not None and nets.generator.w.grad.abs() > 0


def test_discriminator_time_range():
    """t' is uniform on [0, T) by default (the paper's), on [0, disc_t_max T) when narrowed."""
    x_T, x0 = _pair(shape=(B, 1, 1, 2, 2))
    text = torch.zeros(B, 2, 3, dtype=torch.float64)
    batch = PhaseBatch(text=text, negative=text, fake_noise=x_T, generator_noise=x_T,
                       real=RealBatch(x0=x0, text=text, x_T=x_T))
    seen = {}
    for t_max in (1.0, 0.1):
        alg = ADP(_stub_networks(pixel=False), VPVPredSchedule(3.0), 1, (1.0, 1.0), latent_weight=1.0,
                  pixel_weight=0.0, disc_t_max=t_max)
        seen[t_max] = torch.cat([alg.generator_loss(batch, _rng(seed))[2].t_disc for seed in range(40)])
    assert seen[0.1].max() < 100 and seen[1.0].max() >= 500 and seen[1.0].min() < 100


@SCHEDULES
def test_renoise_choices(schedule):
    """``shared``: the pair's x_0 and the generator's x0_hat are re-noised with one fresh draw, so
    real_t' - fake_t' = alpha(t') (x_0 - x0_hat) exactly; ``pair``: that draw is the pair's own x_T,
    so each side is the schedule's point at t' between x_T and its clean end (the real side on the
    pair's line); ``independent`` (default): each has its own noise."""
    x_T, x0 = _pair()
    text = torch.zeros(B, 2, 3, dtype=torch.float64)
    batch = PhaseBatch(text=text, negative=text, fake_noise=x_T, generator_noise=x_T,
                       real=RealBatch(x0=x0, text=text, x_T=x_T))
    gaps, on_line = {}, {}
    for renoise in ("independent", "shared", "pair"):
        alg = ADP(_stub_networks(pixel=False), schedule, 1, (1.0, 1.0), latent_weight=1.0, pixel_weight=0.0,
                  renoise=renoise)
        _, _, pair = alg.generator_loss(batch, _rng(3))
        x0_hat = alg.generator_sample(x_T, x0, text, _rng(3)).detach()
        alpha, _ = (c.view(-1, 1, 1, 1, 1) for c in schedule.coefficients(pair.t_disc))
        fake_t = pair.fake_latent_features[0]  # the stand-in backbone's feature is its input
        gaps[renoise] = (pair.real_noisy - fake_t - alpha * (x0 - x0_hat)).abs().max()
        on_line[renoise] = max((pair.real_noisy - schedule.add_noise(x0, x_T, pair.t_disc)).abs().max(),
                               (fake_t - schedule.add_noise(x0_hat, x_T, pair.t_disc)).abs().max())
    assert gaps["shared"] <= 1e-12 and gaps["pair"] <= 1e-12, gaps
    assert gaps["independent"] > 0.1, gaps
    assert on_line["pair"] <= 1e-12 and on_line["shared"] > 0.1, on_line


def test_renoise_is_refused_outside_adp():
    from adm_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"distill.renoise=shared is an ADP option .* distill.method=dmd2"):
        load_config(None, ["model.teacher=t", "data.real_path=p", "distill.method=dmd2", "distill.renoise=shared"])
    with pytest.raises(ConfigError, match=r"distill.renoise"):
        load_config(None, ["model.teacher=t", "data.real_path=p", "distill.method=adp", "distill.pixel_weight=0",
                           "distill.renoise=paired"])
    assert load_config(None, ["model.teacher=t", "data.real_path=p", "distill.method=adp", "distill.pixel_weight=0",
                              "distill.renoise=pair"]).distill.renoise == "pair"


def test_trainer_builds_adp_with_the_configs_options():
    from adm_megatron.config import load_config
    from adm_megatron.train.trainer import build_algorithm

    config = load_config(None, ["model.teacher=t", "data.real_path=p", "distill.method=adp", "distill.pixel_weight=0",
                                "distill.renoise=pair", "distill.pure_noise_share=0.25"])
    alg = build_algorithm(config, _stub_networks(pixel=False), VPVPredSchedule(3.0))
    assert (alg.renoise, alg.pure_noise_share) == ("pair", 0.25)


def test_pure_noise_share_is_checked():
    from adm_megatron.config import ConfigError, load_config

    base = ["model.teacher=t", "data.real_path=p", "distill.pixel_weight=0"]
    with pytest.raises(ConfigError, match=r"distill.pure_noise_share=1.5: expected a share in \[0, 1\]"):
        load_config(None, [*base, "distill.method=adp", "distill.pure_noise_share=1.5"])
    with pytest.raises(ConfigError, match=r"distill.pure_noise_share=0.5 is an ADP option .* distill.method=dmd2"):
        load_config(None, [*base, "distill.method=dmd2", "distill.pure_noise_share=0.5"])
    assert load_config(None, [*base, "distill.method=adp", "distill.pure_noise_share=0.5"]).distill.pure_noise_share == 0.5
