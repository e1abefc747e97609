"""Loss functions against hand-computed values; DMD gradient, sign and normaliser."""

import math

import pytest
import torch

from adm_megatron.algorithms.losses import (
    diffusion_loss,
    dmd2_gan_d_loss,
    dmd2_gan_g_loss,
    dmd_gradient,
    dmd_loss,
    hinge_d_loss,
    hinge_g_loss,
)

REAL = torch.tensor([[0.5, 2.0], [-1.0, 0.0]])  # [B=2, heads=2]
FAKE = torch.tensor([[-2.0, 0.5], [0.0, -0.5]])
# relu(1 - REAL) = [[0.5, 0], [2, 1]]   -> per sample: sum [0.5, 3.0], mean [0.25, 1.5]
# relu(1 + FAKE) = [[0, 1.5], [1, 0.5]] -> per sample: sum [1.5, 1.5], mean [0.75, 0.75]


# ---------------------------------------------------------------- hinge
def test_hinge_d_loss_hand_values():
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.75 + 1.5)  # heads summed by default
    assert hinge_d_loss(REAL, FAKE, head_reduction="sum").item() == pytest.approx(3.25)
    assert hinge_d_loss(REAL, FAKE, head_reduction="mean").item() == pytest.approx(0.875 + 0.75)
    assert hinge_d_loss(REAL, FAKE, reduction="sum").item() == pytest.approx(3.5 + 3.0)
    torch.testing.assert_close(hinge_d_loss(REAL, FAKE, reduction="none"), torch.tensor([2.0, 4.5]))
    torch.testing.assert_close(
        hinge_d_loss(REAL, FAKE, reduction="none", head_reduction="mean"), torch.tensor([1.0, 2.25])
    )


def test_hinge_d_loss_single_head_and_zero_when_confident():
    assert hinge_d_loss(torch.tensor([2.0, 1.5]), torch.tensor([-3.0, -1.0])).item() == 0.0
    # 1-D logits are one head; [B, 1] gives the same
    r, f = torch.tensor([0.0, 0.5]), torch.tensor([0.0, -0.5])
    assert hinge_d_loss(r, f).item() == pytest.approx((1.0 + 0.5) / 2 + (1.0 + 0.5) / 2)
    assert hinge_d_loss(r[:, None], f[:, None]).item() == pytest.approx(1.5)


def test_hinge_d_loss_gradients():
    real = REAL.clone().requires_grad_(True)
    fake = FAKE.clone().requires_grad_(True)
    hinge_d_loss(real, fake).backward()
    # d/dD_real = -1/B where 1 - D > 0 ; d/dD_fake = +1/B where 1 + D > 0
    torch.testing.assert_close(real.grad, torch.tensor([[-0.5, 0.0], [-0.5, -0.5]]))
    torch.testing.assert_close(fake.grad, torch.tensor([[0.0, 0.5], [0.5, 0.5]]))


def test_hinge_d_loss_different_batch_sizes():
    real = torch.tensor([[0.0], [2.0], [-1.0]])  # relu(1 - r) = [1, 0, 2] -> mean 1
    fake = torch.tensor([[0.0]])  # relu(1 + f) = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="batch"):
        hinge_d_loss(real, fake, reduction="none")


def test_hinge_g_loss_hand_values():
    # per sample: sum [-1.5, -0.5], mean [-0.75, -0.25]
    assert hinge_g_loss(FAKE).item() == pytest.approx(1.0)
    assert hinge_g_loss(FAKE, "sum").item() == pytest.approx(1.0)
    assert hinge_g_loss(FAKE, "mean").item() == pytest.approx(0.5)
    assert hinge_g_loss(FAKE, head_reduction="sum", reduction="sum").item() == pytest.approx(2.0)
    torch.testing.assert_close(hinge_g_loss(FAKE, reduction="none"), torch.tensor([1.5, 0.5]))
    fake = FAKE.clone().requires_grad_(True)
    hinge_g_loss(fake, "mean").backward()
    torch.testing.assert_close(fake.grad, torch.full((2, 2), -0.25))  # -1 / (B * heads)


@pytest.mark.parametrize(
    "fn",
    [
        lambda: hinge_d_loss(REAL, FAKE, head_reduction="max"),
        lambda: hinge_d_loss(REAL, FAKE, reduction="avg"),
        lambda: hinge_g_loss(FAKE, "avg"),
        lambda: hinge_d_loss(REAL, FAKE[:, :1]),
        lambda: hinge_g_loss(torch.zeros(2, 2, 2)),
        lambda: dmd2_gan_d_loss(REAL, FAKE, head_reduction="max"),
        lambda: dmd2_gan_g_loss(FAKE, "median"),
    ],
)
def test_bad_arguments_raise(fn):
    with pytest.raises(ValueError):
        fn()


# ---------------------------------------------------------------- diffusion loss
def test_diffusion_loss_hand_values():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # per-sample mse: [(1 + 4) / 2, (0 + 16) / 2] = [2.5, 8.0]
    assert diffusion_loss(pred, target).item() == pytest.approx(5.25)
    torch.testing.assert_close(diffusion_loss(pred, target, reduction="none"), torch.tensor([2.5, 8.0]))
    assert diffusion_loss(pred, target, reduction="sum").item() == pytest.approx(10.5)
    w = torch.tensor([2.0, 0.5])
    assert diffusion_loss(pred, target, weight=w).item() == pytest.approx((5.0 + 4.0) / 2)
    assert diffusion_loss(pred, target, weight=w[:, None, None]).item() == pytest.approx(4.5)


def test_diffusion_loss_video_shape_and_grad():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 2, 3, 5, requires_grad=True)
    target = torch.randn(3, 4, 2, 3, 5)
    loss = diffusion_loss(pred, target)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / pred.numel())
    with pytest.raises(ValueError, match="shapes differ"):
        diffusion_loss(pred, target[:, :2])
    with pytest.raises(ValueError, match="per sample"):
        diffusion_loss(pred, target, weight=torch.ones(3, 2))


def test_diffusion_loss_bf16_computes_in_fp32():
    pred = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    out = diffusion_loss(pred, torch.zeros_like(pred))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(2.5)


# ---------------------------------------------------------------- DMD
# explicit example, B = 2, 2 elements per sample
X = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
X_REAL = torch.tensor([[0.0, 1.0], [2.0, -2.0]])
X_FAKE = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
# normaliser: mean|X - X_REAL| per sample = [1, 2]
# grad = (X_FAKE - X_REAL) / normaliser = [[2, 1], [-1, 1]]
G = torch.tensor([[2.0, 1.0], [-1.0, 1.0]])


def test_dmd_gradient_hand_values():
    torch.testing.assert_close(dmd_gradient(X, X_REAL, X_FAKE), G)


def test_dmd_loss_value_and_gradient_hand_values():
    x = X.clone().requires_grad_(True)
    real = X_REAL.clone().requires_grad_(True)
    fake = X_FAKE.clone().requires_grad_(True)
    loss = dmd_loss(x, real, fake)
    assert loss.item() == pytest.approx(0.5 * (4 + 1 + 1 + 1) / 4)  # 0.5 * mean(grad^2)
    loss.backward()
    torch.testing.assert_close(x.grad, G / 4)  # grad / numel
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.25], [-0.25, 0.25]]))
    assert real.grad is None and fake.grad is None  # the score predictions are constants


def test_dmd_loss_sgd_step_moves_towards_real_prediction():
    x = X.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=1.0)
    dmd_loss(x, X_REAL, X_FAKE).backward()
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([[0.5, 1.75], [0.25, -0.25]]))
    before_real = (X - X_REAL).norm(dim=1)
    after_real = (x.detach() - X_REAL).norm(dim=1)
    assert (after_real < before_real).all()
    assert (x.detach() - X_FAKE).norm(dim=1)[0] > (X - X_FAKE).norm(dim=1)[0]  # away from fake


def test_dmd_loss_matches_formula_on_random_video_tensor():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 3, 3, requires_grad=True)
    real = torch.randn(3, 4, 2, 3, 3) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1, 1)
    fake = torch.randn(3, 4, 2, 3, 3)
    dmd_loss(x, real, fake).backward()
    norm = (x.detach() - real).abs().flatten(1).mean(1).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(x.grad, (fake - real) / norm / x.numel())
    # with a perfect fake score (x0_fake == x0_gen) gradient descent pulls every sample to real
    x2 = x.detach().clone().requires_grad_(True)
    dmd_loss(x2, real, x2.detach()).backward()
    step = x2.detach() - 10.0 * x2.grad
    assert ((step - real).flatten(1).norm(dim=1) < (x2.detach() - real).flatten(1).norm(dim=1)).all()


def test_dmd_loss_degenerate_and_bf16():
    x = torch.zeros(2, 3, requires_grad=True)
    loss = dmd_loss(x, torch.zeros(2, 3), torch.ones(2, 3))  # normaliser 0 -> eps clamp
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    xb = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    lb = dmd_loss(xb, X_REAL.bfloat16(), X_FAKE.bfloat16())
    assert lb.dtype == torch.float32
    lb.backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), G / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        dmd_loss(x, torch.zeros(2, 2), torch.zeros(2, 3))


# ---------------------------------------------------------------- DMD2 GAN
LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


def test_dmd2_gan_g_loss_hand_values():
    logits = torch.tensor([[0.0], [math.log(3.0)]])
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(1 + 1/3)
    assert dmd2_gan_g_loss(logits).item() == pytest.approx((LN2 + LN43) / 2)
    two_heads = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert dmd2_gan_g_loss(two_heads, "sum").item() == pytest.approx(((LN2 + LN43) + 2 * LN2) / 2)
    assert dmd2_gan_g_loss(two_heads, "mean").item() == pytest.approx(((LN2 + LN43) / 2 + LN2) / 2)
    x = logits.clone().requires_grad_(True)
    dmd2_gan_g_loss(x).backward()
    # d softplus(-z)/dz = -sigmoid(-z): [-1/2, -1/4] / B
    torch.testing.assert_close(x.grad, torch.tensor([[-0.25], [-0.125]]))


def test_dmd2_gan_d_loss_hand_values():
    real = torch.tensor([[0.0], [math.log(3.0)]])
    fake = torch.tensor([[0.0], [-math.log(3.0)]])
    # softplus(fake) = [ln 2, ln 4/3], softplus(-real) = [ln 2, ln 4/3]
    assert dmd2_gan_d_loss(real, fake).item() == pytest.approx(LN2 + LN43)
    torch.testing.assert_close(
        dmd2_gan_d_loss(real, fake, reduction="none"), torch.tensor([2 * LN2, 2 * LN43])
    )
    # a confident discriminator has a small loss, a wrong one a large loss
    assert dmd2_gan_d_loss(torch.tensor([10.0]), torch.tensor([-10.0])).item() < 1e-4
    assert dmd2_gan_d_loss(torch.tensor([-10.0]), torch.tensor([10.0])).item() == pytest.approx(20.0, abs=1e-3)
