"""Generator rollout against diffusers' sampling loop; per-sample CFG in one batched forward.

Tolerance: absolute 1e-6 on float32 samples of unit scale.
"""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

from adm_megatron.diffusion.guidance import cfg_model_output, sample_guidance_scales
from adm_megatron.diffusion.rollout import predict_x0, rollout
from adm_megatron.diffusion.schedules import FlowMatchSchedule, VPVPredSchedule

ATOL = 1e-6
SHAPE = (2, 4, 5, 5)  # [B, C, H, W]


class TinyModel:
    """A fixed random map of (x, t, cond): mixing along dim 1, a t-dependent term and cond."""

    def __init__(self, shape=SHAPE, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.3 * torch.randn(shape[1], shape[1], generator=g)
        self.u = torch.randn(shape[1:], generator=g)
        self.calls = []

    def __call__(self, x, t, cond=None):
        self.calls.append((x.shape[0], t.clone()))
        tt = (t.double() / 1000).float().view((-1,) + (1,) * (x.dim() - 1))
        out = torch.einsum("ij,bj...->bi...", self.w, x) + torch.tanh(3 * tt - 1) * self.u
        if cond is not None:
            out = out + cond.view(cond.shape + (1,) * (x.dim() - 2))
        return out


def vp_pair():
    ref = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0
    )
    return ref, VPVPredSchedule(3.0)


def flow_pair():
    return FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchSchedule(3.0)


PAIRS = pytest.mark.parametrize("pair", [vp_pair, flow_pair], ids=["vp", "flow"])


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_loop(ref, model, x, n, cond=None, steps=None):
    ref.set_timesteps(n)
    for t in ref.timesteps[:steps]:
        x = ref.step(model(x, t.expand(x.shape[0]), cond), t, x).prev_sample
    return x


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@PAIRS
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_rollout_matches_diffusers_loop(pair, n):
    ref, sched = pair()
    model, x_T, cond = TinyModel(), randn(SHAPE, 1), 0.1 * randn((2, 4), 2)
    got = rollout(model, sched, x_T, cond, sched.inference_timesteps(n))
    assert max_err(got, diffusers_loop(ref, model, x_T, n, cond)) <= ATOL
    assert len(model.calls) == 2 * n and all(b == 2 for b, _ in model.calls)
    assert got.abs().max() > 0.1  # a real sample, not a degenerate zero


@PAIRS
def test_rollout_video_rank(pair):
    """[B, F, C, H, W] latents: per-sample t broadcasts over every latent dim."""
    ref, sched = pair()
    shape = (2, 3, 4, 5, 5)
    model, x_T = TinyModel(shape), randn(shape, 3)
    got = rollout(model, sched, x_T, None, sched.inference_timesteps(4))
    assert max_err(got, diffusers_loop(ref, model, x_T, 4)) <= ATOL


@PAIRS
def test_stop_index_then_rest_equals_full(pair):
    ref, sched = pair()
    model, x_T, n_steps = TinyModel(), randn(SHAPE, 4), 8
    ts = sched.inference_timesteps(n_steps)
    full = rollout(model, sched, x_T, None, ts)
    assert torch.equal(rollout(model, sched, x_T, None, ts, stop_index=n_steps), x_T)
    for n in range(1, n_steps + 1):
        mid = rollout(model, sched, x_T, None, ts, stop_index=n)
        # At t_n: exactly N - n diffusers steps were taken.
        assert max_err(mid, diffusers_loop(ref, model, x_T, n_steps, steps=n_steps - n)) <= ATOL
        assert torch.equal(rollout(model, sched, mid, None, ts, start_index=n), full)
        assert torch.equal(rollout(model, sched, mid, None, ts, start_index=n, stop_index=0), full)
    with pytest.raises(ValueError):
        rollout(model, sched, x_T, None, ts, stop_index=n_steps + 1)


@PAIRS
def test_predict_x0_and_grad_flag(pair):
    ref, sched = pair()
    weight = torch.nn.Parameter(torch.tensor(1.0))

    def model(x, t, cond):
        return weight * TinyModel()(x, t)

    x_T, ts = randn(SHAPE, 5), sched.inference_timesteps(4)
    no_grad = rollout(model, sched, x_T, None, ts, stop_index=2)
    assert not no_grad.requires_grad and no_grad.grad_fn is None
    with_grad = rollout(model, sched, x_T, None, ts, stop_index=2, grad=True)
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), no_grad, rtol=0, atol=0)
    # The generator step: rolled without grad to t_n, one step with grad to x0_hat.
    t_n = ts[len(ts) - 2]
    x0_hat = predict_x0(model, sched, no_grad, t_n, None)
    x0_hat.square().sum().backward()
    assert weight.grad is not None and weight.grad != 0
    sigma = (1 - VPVPredSchedule(3.0).alphas_cumprod[t_n]).sqrt() if isinstance(sched, VPVPredSchedule) else None
    with torch.no_grad():
        v = model(no_grad, t_n.expand(2), None)
        if sigma is None:
            expected = no_grad - (t_n / 1000) * v
        else:
            expected = (1 - sigma**2).sqrt() * no_grad - sigma * v
    assert max_err(x0_hat, expected) <= ATOL


# --------------------------------------------------------------------------- CFG
def test_cfg_one_batched_forward_equals_separate():
    model, x, t = TinyModel(), randn(SHAPE, 6), torch.tensor([999, 500])
    cond, uncond = randn((2, 4), 7), torch.zeros(2, 4)
    scale = torch.tensor([5.0, 7.0])
    got = cfg_model_output(model, x, t, cond, uncond, scale)
    assert len(model.calls) == 1 and model.calls[0][0] == 4
    assert torch.equal(model.calls[0][1], torch.tensor([999, 500, 999, 500]))
    out_c, out_u = model(x, t, cond), model(x, t, uncond)
    expected = out_u + scale.view(-1, 1, 1, 1) * (out_c - out_u)
    assert max_err(got, expected) <= ATOL
    # a float scale and a scalar t broadcast
    got = cfg_model_output(model, x, 500, cond, uncond, 6.0)
    ts = torch.tensor([500, 500])
    assert max_err(got, model(x, ts, uncond) + 6.0 * (model(x, ts, cond) - model(x, ts, uncond))) <= ATOL


def test_cfg_structured_conditioning():
    seen = {}

    def model(x, t, c):
        seen.update(batch=(x.shape[0], c["text"].shape[0], c["pooled"][0].shape[0]), none=c["mask"])
        return x * c["pooled"][0].view(-1, 1, 1, 1) + c["text"].sum(1).view(-1, 1, 1, 1)

    x = randn(SHAPE, 8)
    cond = {"text": randn((2, 3), 9), "pooled": (randn((2,), 10),), "mask": None}
    uncond = {"text": torch.zeros(2, 3), "pooled": (torch.ones(2),), "mask": None}
    got = cfg_model_output(model, x, 1, cond, uncond, torch.tensor([2.0, 3.0]))
    assert seen == {"batch": (4, 4, 4), "none": None}
    out_c, out_u = model(x, None, cond), model(x, None, uncond)
    assert max_err(got, out_u + torch.tensor([2.0, 3.0]).view(-1, 1, 1, 1) * (out_c - out_u)) <= ATOL
    with pytest.raises(ValueError, match="keys"):
        cfg_model_output(model, x, 1, cond, {"text": uncond["text"]}, 2.0)


def test_cfg_bf16_output_dtype():
    x = randn(SHAPE, 11).bfloat16()
    cond, uncond = torch.full((2, 1, 1, 1), 2.0).bfloat16(), torch.ones(2, 1, 1, 1).bfloat16()
    out = cfg_model_output(lambda a, t, c: a * c, x, 0, cond, uncond, 3.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (x.float() * 4).bfloat16())


def test_guidance_scales_per_sample_in_range_and_reproducible():
    s = sample_guidance_scales(64, (5.0, 7.0), torch.Generator().manual_seed(0))
    assert s.shape == (64,) and s.dtype == torch.float32
    assert s.min() >= 5.0 and s.max() <= 7.0 and len(s.unique()) == 64
    assert torch.equal(s, sample_guidance_scales(64, (5.0, 7.0), torch.Generator().manual_seed(0)))
    assert not torch.equal(s, sample_guidance_scales(64, (5.0, 7.0), torch.Generator().manual_seed(1)))
    assert torch.equal(sample_guidance_scales(3, (4.0, 4.0), torch.Generator()), torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="lo <= hi"):
        sample_guidance_scales(2, (8.0, 6.0), torch.Generator())


@pytest.mark.parametrize("pair", [vp_pair, flow_pair], ids=["vp", "flow"])
def test_model_gets_its_timestep_on_the_sample_device(pair):
    """The schedule's timesteps live on the CPU; the model (a GPU's, in training) must receive them
    where x_t is, or its time embedding's matmul mixes devices. The meta device stands in for CUDA."""
    _, schedule = pair()
    seen = []

    def model_fn(x, t, cond):
        seen.append(t.device)
        return torch.zeros_like(x)

    x_T = torch.empty(SHAPE, device="meta")
    rollout(model_fn, schedule, x_T, None, schedule.inference_timesteps(2))
    predict_x0(model_fn, schedule, x_T, schedule.inference_timesteps(2)[0], None)
    assert seen == [x_T.device] * 3
