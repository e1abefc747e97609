r"""Loss functions of ADM and of the DMD / DMD2 baseline: pure tensor functions.

Conventions
-----------
* Discriminator logits have shape ``[B, heads]`` (one column per discriminator head, as returned
  by :class:`adm_megatron.heads.MultiHeadDiscriminator`); a 1-D ``[B]`` tensor is one head.
* ``head_reduction`` ('sum' | 'mean', default 'sum') combines the per-head losses of a sample;
  the expectation over samples is then taken by ``reduction`` ('mean' | 'sum' | 'none'; 'none'
  returns the per-sample loss ``[B]``).  With one head 'sum' and 'mean' agree.
* Real and fake batches may differ in size unless ``reduction='none'``; each expectation is
  taken over its own batch.

Equations (``h`` indexes heads, ``R`` is the head reduction)
-----------------------------------------------------------
* hinge, discriminator:  L_D = E_real[R_h max(0, 1 - D_h(x))] + E_fake[R_h max(0, 1 + D_h(x))]
* hinge, generator:      L_G = -E_fake[R_h D_h(x)]
* diffusion (fake score): L = E_b[w_b * mean_i (pred_bi - target_bi)^2]
* DMD (DMD2's implementation):
      g   = (x0_fake - x0_real) / max(eps, mean_{non-batch} |x0_gen - x0_real|)    (per sample)
      L   = 0.5 * mean_{all} (x0_gen - sg(x0_gen - g))^2                          (sg: stop-grad)
      dL/d x0_gen = g / x0_gen.numel()
  so gradient descent moves x0_gen along -(x0_fake - x0_real), i.e. towards the real-score
  (teacher) prediction and away from the fake-score prediction.
* DMD2 GAN (non-saturating, softplus on logits):
      generator:      L_G = E_fake[R_h softplus(-D_h(x))]
      discriminator:  L_D = E_fake[R_h softplus(D_h(x))] + E_real[R_h softplus(-D_h(x))]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_REDUCTIONS = ("sum", "mean")
REDUCTIONS = ("mean", "sum", "none")


def _reduce_heads(per_head: torch.Tensor, head_reduction: str) -> torch.Tensor:
    """``[B, heads]`` (or ``[B]``) -> ``[B]`` by summing or averaging the heads."""
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}")
    if per_head.dim() == 1:
        return per_head
    if per_head.dim() != 2:
        raise ValueError(f"logits must have shape [B, heads] or [B], got {tuple(per_head.shape)}")
    return per_head.sum(dim=1) if head_reduction == "sum" else per_head.mean(dim=1)


def _reduce_batch(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_pair(logits_real: torch.Tensor, logits_fake: torch.Tensor, reduction: str) -> None:
    if logits_real.dim() != logits_fake.dim() or logits_real.shape[1:] != logits_fake.shape[1:]:
        raise ValueError(
            f"real and fake logits must have the same number of heads, got "
            f"{tuple(logits_real.shape)} and {tuple(logits_fake.shape)}"
        )
    if reduction == "none" and logits_real.shape[0] != logits_fake.shape[0]:
        raise ValueError(
            f"reduction='none' needs equal real/fake batch sizes, got "
            f"{tuple(logits_real.shape)} and {tuple(logits_fake.shape)}"
        )


def hinge_d_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    reduction: str = "mean",
    head_reduction: str = "sum",
) -> torch.Tensor:
    """Hinge discriminator loss ``E[max(0, 1 - D(x_real))] + E[max(0, 1 + D(x_fake))]``.

    Args:
        logits_real: ``[B_r, heads]`` (or ``[B_r]``) logits on real samples (teacher side).
        logits_fake: ``[B_f, heads]`` (or ``[B_f]``) logits on fake samples (fake-score side).
        reduction: 'mean' | 'sum' over samples, or 'none' for the per-sample ``[B]`` loss.
        head_reduction: 'sum' | 'mean' over heads.
    Inputs are used as given: detach the discriminator inputs (not the logits) upstream.
    """
    _check_pair(logits_real, logits_fake, reduction)
    real = _reduce_heads(F.relu(1.0 - logits_real), head_reduction)
    fake = _reduce_heads(F.relu(1.0 + logits_fake), head_reduction)
    if reduction == "none":
        return real + fake
    return _reduce_batch(real, reduction) + _reduce_batch(fake, reduction)


def hinge_g_loss(
    logits_fake: torch.Tensor, head_reduction: str = "sum", reduction: str = "mean"
) -> torch.Tensor:
    """Hinge generator loss ``-E[D(x_fake)]`` on ``[B, heads]`` (or ``[B]``) logits."""
    return _reduce_batch(-_reduce_heads(logits_fake, head_reduction), reduction)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-sample mean squared error ``w_b * mean_i (pred_bi - target_bi)^2``, reduced over b.

    Args:
        pred, target: ``[B, ...]`` of equal shape (noise target for eps-models, velocity for
            v-/flow-models); computed in float32 at least.
        weight: optional per-sample weight of shape ``[B]`` (or broadcastable to it).
        reduction: 'mean' | 'sum' over samples, or 'none' for the ``[B]`` per-sample loss.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"diffusion_loss: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    per_sample = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    if weight is not None:
        weight = weight.to(dtype)
        if weight.dim() > 1:
            weight = weight.reshape(weight.shape[0], -1)
            if weight.shape[1] != 1:
                raise ValueError(
                    f"diffusion_loss: weight must be per sample ([B]), got {tuple(weight.shape)}"
                )
            weight = weight[:, 0]
        per_sample = per_sample * weight
    return _reduce_batch(per_sample, reduction)


def dmd_gradient(
    x0_gen: torch.Tensor,
    x0_real_pred: torch.Tensor,
    x0_fake_pred: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DMD's normalised distribution-matching direction (no graph; float32 or wider).

    ``g = (x0_fake_pred - x0_real_pred) / max(eps, mean_{non-batch}|x0_gen - x0_real_pred|)``,
    the normaliser taken per sample.  DMD2 writes it as ``(p_real - p_fake) / |p_real|.mean``
    with ``p_real = x - x0_real``, ``p_fake = x - x0_fake`` (identical).  Non-finite entries are
    zeroed (DMD2's ``nan_to_num``); ``eps`` keeps a sample with ``x0_gen == x0_real_pred`` from
    dividing by zero.
    """
    if not (x0_gen.shape == x0_real_pred.shape == x0_fake_pred.shape):
        raise ValueError(
            f"dmd: x0_gen, x0_real_pred, x0_fake_pred shapes differ: {tuple(x0_gen.shape)}, "
            f"{tuple(x0_real_pred.shape)}, {tuple(x0_fake_pred.shape)}"
        )
    with torch.no_grad():
        dtype = torch.promote_types(x0_gen.dtype, torch.float32)
        x = x0_gen.detach().to(dtype)
        real = x0_real_pred.detach().to(dtype)
        fake = x0_fake_pred.detach().to(dtype)
        dims = tuple(range(1, x.dim()))
        normaliser = (x - real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        grad = (fake - real) / normaliser
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(
    x0_gen: torch.Tensor,
    x0_real_pred: torch.Tensor,
    x0_fake_pred: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DMD / DMD2 distribution-matching surrogate loss (a scalar).

    ``L = 0.5 * F.mse_loss(x0_gen, (x0_gen - g).detach())`` with ``g`` from :func:`dmd_gradient`,
    so ``dL/dx0_gen = g / x0_gen.numel()`` (mean over every element, batch included, as in DMD2)
    and an SGD step moves ``x0_gen`` towards ``x0_real_pred`` (away from ``x0_fake_pred``).  The
    teacher (real) and fake-score predictions are treated as constants; the gradient reaches the
    generator only through ``x0_gen``.  The loss value is ``0.5 * mean(g ** 2)``, a diagnostic,
    not an objective.
    """
    grad = dmd_gradient(x0_gen, x0_real_pred, x0_fake_pred, eps)
    x = x0_gen.to(grad.dtype)
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def dmd2_gan_g_loss(
    logits_fake: torch.Tensor, head_reduction: str = "sum", reduction: str = "mean"
) -> torch.Tensor:
    """DMD2 non-saturating generator GAN loss ``E[softplus(-D(x_fake))]``."""
    return _reduce_batch(_reduce_heads(F.softplus(-logits_fake), head_reduction), reduction)


def dmd2_gan_d_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    reduction: str = "mean",
    head_reduction: str = "sum",
) -> torch.Tensor:
    """DMD2 discriminator GAN loss ``E[softplus(D(x_fake))] + E[softplus(-D(x_real))]``."""
    _check_pair(logits_real, logits_fake, reduction)
    real = _reduce_heads(F.softplus(-logits_real), head_reduction)
    fake = _reduce_heads(F.softplus(logits_fake), head_reduction)
    if reduction == "none":
        return real + fake
    return _reduce_batch(real, reduction) + _reduce_batch(fake, reduction)
