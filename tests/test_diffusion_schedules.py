"""Schedules against diffusers' CogVideoXDDIMScheduler and FlowMatchEulerDiscreteScheduler.

Tolerances: alpha_bar relative 1e-6 (it spans 1 .. 0 with a tail near 1e-8); samples of unit
scale (float32) absolute 1e-6, i.e. a few float32 ulps.
"""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, FlowMatchEulerDiscreteScheduler

from adm_megatron.diffusion.schedules import (
    FlowMatchSchedule,
    VPVPredSchedule,
    schedule_from_diffusers_config,
)

ATOL = 1e-6
VIDEO = (2, 3, 4, 6, 6)  # [B, F, C, H, W]
IMAGE = (3, 4, 6, 6)  # [B, C, H, W]


def cogvideox(snr_shift_scale, **kw):
    cfg = dict(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=snr_shift_scale,
        clip_sample=False,
    )
    cfg.update(kw)
    return CogVideoXDDIMScheduler(**cfg)


def ours(ref):
    return schedule_from_diffusers_config({"_class_name": type(ref).__name__, **ref.config})


@pytest.fixture(params=[3.0, 1.0], ids=["2b", "5b"])
def vp(request):
    ref = cogvideox(request.param)
    return ref, ours(ref)


@pytest.fixture
def flow():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return ref, ours(ref)


def randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- VP (CogVideoX)
def test_vp_alphas_cumprod_match_diffusers(vp):
    ref, sched = vp
    assert isinstance(sched, VPVPredSchedule)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)
    assert sched.alphas_cumprod[-1] == 0  # zero terminal SNR


def test_vp_snr_shift_changes_schedule():
    a2b, a5b = VPVPredSchedule(3.0).alphas_cumprod, VPVPredSchedule(1.0).alphas_cumprod
    assert (a2b[1:-1] < a5b[1:-1]).all()  # shift > 1 lowers the SNR


@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_vp_inference_timesteps_match_diffusers(vp, n):
    ref, sched = vp
    ref.set_timesteps(n)
    ts = sched.inference_timesteps(n)
    assert ts.dtype == torch.int64 and torch.equal(ts, ref.timesteps)
    assert sched.previous_timesteps(ts)[-1] == -1


@pytest.mark.parametrize("shape", [VIDEO, IMAGE])
@pytest.mark.parametrize("kind", ["vp-2b", "vp-5b", "flow"])
def test_ode_step_matches_diffusers_step(kind, shape):
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0) if kind == "flow" else cogvideox(3.0 if kind == "vp-2b" else 1.0)
    sched = ours(ref)
    ref.set_timesteps(8)
    ts = sched.inference_timesteps(8)
    prev = sched.previous_timesteps(ts)
    x, worst = randn(shape, 0), 0.0
    for i, (t, tp) in enumerate(zip(ts, prev)):
        v = randn(shape, 100 + i)
        expected = ref.step(v, t, x).prev_sample
        got = sched.ode_step(x, v, t.expand(shape[0]), tp.expand(shape[0]))
        assert got.dtype == x.dtype and got.shape == x.shape
        worst = max(worst, max_err(got, expected))
        x = expected
    assert worst <= ATOL


def test_vp_ode_step_per_sample_timesteps(vp):
    """Different t per sample: each sample equals its own diffusers step."""
    ref, sched = vp
    ref.set_timesteps(8)
    t, tp = torch.tensor([999, 499, 124]), torch.tensor([874, 374, -1])
    x, v = randn(IMAGE, 1), randn(IMAGE, 2)
    got = sched.ode_step(x, v, t, tp)
    for b in range(3):
        expected = ref.step(v[b : b + 1], int(t[b]), x[b : b + 1]).prev_sample
        assert max_err(got[b : b + 1], expected) <= ATOL


def test_vp_final_alpha_without_set_alpha_to_one():
    ref = cogvideox(3.0, set_alpha_to_one=False)
    sched = ours(ref)
    ref.set_timesteps(4)
    x, v = randn(IMAGE, 3), randn(IMAGE, 4)
    got = sched.ode_step(x, v, torch.full((3,), 249), torch.full((3,), -1))
    assert max_err(got, ref.step(v, 249, x).prev_sample) <= ATOL
    # With set_alpha_to_one the last step lands exactly on x0_hat.
    default = ours(cogvideox(3.0))
    x0_hat, _ = default.model_output_to_x0_eps(x, v, 249)
    assert max_err(default.ode_step(x, v, 249, -1), x0_hat) <= ATOL


@pytest.mark.parametrize("shape", [VIDEO, IMAGE])
def test_vp_add_noise_and_target(vp, shape):
    ref, sched = vp
    x0, eps = randn(shape, 5), randn(shape, 6)
    t = torch.tensor([999, 0, 500][: shape[0]])
    # diffusers casts alpha_bar to the sample dtype before sqrt(1 - ab): in float32 that costs
    # ~1e-6 near t = 0, so compare with diffusers run in float64 and, looser, in float32.
    noisy = sched.add_noise(x0, eps, t)
    assert max_err(noisy, ref.add_noise(x0.double(), eps.double(), t)) <= ATOL
    assert max_err(noisy, ref.add_noise(x0, eps, t)) <= 3e-6
    ab = ref.alphas_cumprod[t].double().view((-1,) + (1,) * (len(shape) - 1))
    definition = ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()  # v = sqrt(ab) eps - sqrt(1-ab) x0
    assert max_err(sched.target(x0, eps, t), definition) <= ATOL
    assert max_err(sched.target(x0, eps, t), ref.get_velocity(x0.double(), eps.double(), t)) <= ATOL


def test_vp_predictions_from_step(vp):
    ref, sched = vp
    ref.set_timesteps(8)
    x, v = randn(VIDEO, 7), randn(VIDEO, 8)
    x0_hat, _ = sched.model_output_to_x0_eps(x, v, 624)
    assert max_err(x0_hat, ref.step(v, 624, x).pred_original_sample) <= ATOL


def test_vp_timestep_helpers():
    sched = VPVPredSchedule(3.0)
    g = torch.Generator().manual_seed(0)
    t = sched.sample_training_timesteps(4096, g)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 900
    assert torch.equal(t, sched.sample_training_timesteps(4096, torch.Generator().manual_seed(0)))
    assert torch.equal(sched.shifted_by(torch.tensor([999, 10]), 16), torch.tensor([983, 0]))
    assert sched.model_timestep(torch.tensor([5])).dtype == torch.int64
    with pytest.raises(ValueError, match="delta"):
        sched.shifted_by(torch.tensor([999]), 15.625)
    with pytest.raises(TypeError, match="integers"):
        sched.add_noise(randn(IMAGE, 0), randn(IMAGE, 1), torch.tensor([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- flow (SD3)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_flow_inference_timesteps_match_diffusers(flow, n):
    ref, sched = flow
    ref.set_timesteps(n)
    ts = sched.inference_timesteps(n)
    assert ts.dtype == torch.float32 and torch.equal(ts, ref.timesteps)
    torch.testing.assert_close(sched.previous_timesteps(ts) / 1000, ref.sigmas[1:], rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", [VIDEO, IMAGE])
def test_flow_add_noise_matches_scale_noise(flow, shape):
    ref, sched = flow
    x0, eps = randn(shape, 9), randn(shape, 10)
    t = ref.timesteps[torch.tensor([0, 400, 999])[: shape[0]]]  # training grid, per-sample
    assert max_err(sched.add_noise(x0, eps, t), ref.scale_noise(x0, t, eps)) <= ATOL
    ref.set_timesteps(4)
    t = ref.timesteps[torch.tensor([3, 1, 2])[: shape[0]]]
    assert max_err(sched.add_noise(x0, eps, t), ref.scale_noise(x0, t, eps)) <= ATOL
    assert max_err(sched.target(x0, eps, t), eps - x0) <= ATOL  # v = eps - x0


def test_flow_ode_step_is_euler():
    sched = FlowMatchSchedule(3.0)
    x, v = randn(IMAGE, 11), randn(IMAGE, 12)
    t, tp = torch.tensor([900.0, 500.0, 20.0]), torch.tensor([700.0, 0.0, 10.0])
    expected = x + ((tp - t) / 1000).view(-1, 1, 1, 1) * v
    assert max_err(sched.ode_step(x, v, t, tp), expected) <= ATOL


def test_flow_timestep_helpers():
    sched = FlowMatchSchedule(3.0)
    t = sched.sample_training_timesteps(4096, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() <= 1000
    sigma = t.double() / 1000
    u = sigma / (3.0 - 2.0 * sigma)  # inverse of the shift
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch.equal(t, sched.sample_training_timesteps(4096, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(sched.shifted_by(torch.tensor([500.0, 10.0]), 15.625), torch.tensor([484.375, 0.0]))
    assert sched.model_timestep(torch.tensor([5])).dtype == torch.float32


# --------------------------------------------------------------------------- both
@pytest.mark.parametrize("sched", [VPVPredSchedule(3.0), FlowMatchSchedule(3.0)], ids=["vp", "flow"])
@pytest.mark.parametrize("shape", [VIDEO, IMAGE])
def test_prediction_inverts_forward_process(sched, shape):
    """x_t = add_noise(x0, eps, t) and out = target(x0, eps, t) give back (x0, eps)."""
    x0, eps = randn(shape, 13), randn(shape, 14)
    t = sched.sample_training_timesteps(shape[0], torch.Generator().manual_seed(1))
    t[0] = 999 if isinstance(sched, VPVPredSchedule) else 1000.0  # pure noise end
    x_t, v = sched.add_noise(x0, eps, t), sched.target(x0, eps, t)
    x0_hat, eps_hat = sched.model_output_to_x0_eps(x_t, v, t)
    assert max_err(x0_hat, x0) <= 1e-5 and max_err(eps_hat, eps) <= 1e-5
    # The exact velocity moves x_t along the forward process to t_prev.
    t_prev = sched.shifted_by(t, 100)
    assert max_err(sched.ode_step(x_t, v, t, t_prev), sched.add_noise(x0, eps, t_prev)) <= 1e-5


@pytest.mark.parametrize("sched", [VPVPredSchedule(3.0), FlowMatchSchedule(3.0)], ids=["vp", "flow"])
def test_dtype_and_scalar_t(sched):
    t = sched.inference_timesteps(4)[1]
    x = randn(IMAGE, 15)
    for dtype in (torch.bfloat16, torch.float64):
        assert sched.ode_step(x.to(dtype), x.to(dtype), t, 0).dtype == dtype
    assert torch.equal(sched.add_noise(x, x, t), sched.add_noise(x, x, t.expand(3)))
    with pytest.raises(ValueError, match="shape"):
        sched.add_noise(x, x, t.expand(2))


def test_float64_vp_step_is_exact():
    ref, sched = cogvideox(3.0), VPVPredSchedule(3.0)
    ref.set_timesteps(8)
    x, v = randn(VIDEO, 16, torch.float64), randn(VIDEO, 17, torch.float64)
    assert max_err(sched.ode_step(x, v, 874, 749), ref.step(v, 874, x).prev_sample) <= 1e-12


# --------------------------------------------------------------------------- configs
def test_from_diffusers_config_rejects_unsupported():
    base = dict(cogvideox(3.0).config)
    for key, value in [
        ("prediction_type", "epsilon"),
        ("timestep_spacing", "leading"),
        ("beta_schedule", "linear"),
        ("thresholding", True),
    ]:
        with pytest.raises(ValueError, match=key) as err:
            VPVPredSchedule.from_diffusers_config({**base, key: value})
        assert "\n" not in str(err.value)
    missing = {k: v for k, v in base.items() if k != "prediction_type"}  # diffusers default: epsilon
    with pytest.raises(ValueError, match="prediction_type"):
        VPVPredSchedule.from_diffusers_config(missing)
    flow_cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for key, value in [("use_dynamic_shifting", True), ("invert_sigmas", True), ("use_karras_sigmas", True)]:
        with pytest.raises(ValueError, match=key):
            FlowMatchSchedule.from_diffusers_config({**flow_cfg, key: value})
    with pytest.raises(ValueError, match="_class_name"):
        schedule_from_diffusers_config({"_class_name": "EulerDiscreteScheduler"})


def test_from_diffusers_config_reads_values():
    sd3 = FlowMatchSchedule.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert sd3.shift == 3.0 and sd3.num_train_timesteps == 1000
    cfg5b = {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
             "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0}
    assert torch.equal(VPVPredSchedule.from_diffusers_config(cfg5b).alphas_cumprod, VPVPredSchedule(1.0).alphas_cumprod)
    dpm = CogVideoXDPMScheduler(**cfg5b)
    from_dpm = schedule_from_diffusers_config({"_class_name": "CogVideoXDPMScheduler", **dpm.config})
    assert torch.equal(from_dpm.alphas_cumprod, dpm.alphas_cumprod)
    no_rescale = VPVPredSchedule.from_diffusers_config({**cfg5b, "rescale_betas_zero_snr": False})
    assert no_rescale.alphas_cumprod[-1] > 0
