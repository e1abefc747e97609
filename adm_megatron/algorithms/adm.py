"""Adversarial Distribution Matching (ADM, Algorithm 1): what each phase computes.

- fake-score phase: x0 = G(z) by the N-step PF-ODE (no grad); the fake score learns the ordinary
  diffusion (velocity) loss on q(x_t | x0), no CFG.
- generator phase: from its own noise ẑ (independent of z), a random n in [1, N]; the ODE rolls
  from t_N to t_n without grad, one step with grad gives x̂0 = G(x_{t_n}, t_n); fresh noise
  diffuses it to x_t (t uniform, t - Δt >= 0); one PF-ODE step of size Δt with the fake score
  gives x_fake(t - Δt) (gradient reaches θ through x_t and through the fake model's step, ψ frozen)
  and one with the CFG teacher gives x_real(t - Δt) (no grad). L_G = -E[D(x_fake, t - Δt)] (hinge).
- discriminator phase: L_D = E[max(0, 1 + D(x_fake))] + E[max(0, 1 - D(x_real))] on the detached
  pair of the generator phase of the same iteration (one pair per iteration, as in Algorithm 1).
  The frozen backbone's features of x_fake are the ones the generator phase computed (see
  ``generator_loss``), so this phase runs the backbone on x_real only.

Two ablation switches exist only to show what each part contributes (the toy study's controls):
``train_discriminator=False`` keeps the heads at their random start, ``fake_score_grad=False``
cuts the gradient path through the fake score's ODE step (x_fake from a stop-gradient output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.algorithms.base import Distillation, PhaseBatch
from adm_megatron.algorithms.discriminator_health import discriminator_health
from adm_megatron.algorithms.losses import hinge_d_loss, hinge_g_loss
from adm_megatron.algorithms.randomness import BatchRandom


@dataclass
class OdePair:
    """The generator phase's one-step ODE outputs at t - Δt, kept for the discriminator phase."""

    x_fake: torch.Tensor  # with grad to the generator in the generator phase
    x_real: torch.Tensor
    t_prev: torch.Tensor
    fake_features: list[torch.Tensor] | None = None  # the backbone's features of x_fake (detached)


class ADM(Distillation):
    has_discriminator = True

    def __init__(self, *args, delta_t: int, train_discriminator: bool = True, fake_score_grad: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < delta_t < self.schedule.num_train_timesteps:
            raise ValueError(
                f"distill.delta_t={delta_t}: expected 0 < delta_t < {self.schedule.num_train_timesteps}"
            )
        self.delta_t = delta_t
        self.discriminator_phase = train_discriminator
        self.fake_score_grad = fake_score_grad

    def ode_pair(self, x0_hat: torch.Tensor, batch: PhaseBatch, rng: BatchRandom) -> OdePair:
        x_t, t, _ = self.diffuse(x0_hat, rng, t_min=self.delta_t)
        t_prev = self.schedule.shifted_by(t, self.delta_t)
        fake_out = self.nets.fake_score(x_t, self.schedule.model_timestep(t), batch.cond)
        if not self.fake_score_grad:
            fake_out = fake_out.detach()
        x_fake = self.schedule.ode_step(x_t, fake_out, t, t_prev)
        real_out = self.teacher_output(x_t.detach(), t, batch, rng)
        x_real = self.schedule.ode_step(x_t.detach(), real_out, t, t_prev)
        return OdePair(x_fake=x_fake, x_real=x_real, t_prev=t_prev)

    def backbone_features(self, x: torch.Tensor, t: torch.Tensor, batch: PhaseBatch) -> list[torch.Tensor]:
        """The frozen teacher's tapped block outputs of (x, t): D's backbone, without its heads."""
        return self.nets.teacher.features(x, self.schedule.model_timestep(t), batch.cond, self.nets.head_every)

    def discriminate(self, x: torch.Tensor, t: torch.Tensor, batch: PhaseBatch) -> torch.Tensor:
        """D(x, t): heads on the frozen teacher's features -> logits [B, heads]."""
        return self.nets.heads(self.backbone_features(x, t, batch))

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        pair = self.ode_pair(self.generator_x0(batch, rng), batch, rng)
        fake_features = self.backbone_features(pair.x_fake, pair.t_prev, batch)
        logits_fake = self.nets.heads(fake_features)
        loss = hinge_g_loss(logits_fake, head_reduction=self.head_reduction)
        # The discriminator phase reuses these features instead of running the backbone on x_fake
        # again. That is exact: they depend only on the backbone's weights (the teacher, frozen for
        # the whole run), on (x_fake, t - Δt, text), which the discriminator phase receives as these
        # very values (detached), and on nothing the generator's update changes; the heads, which do
        # change, are applied afresh there. Cost: the features stay alive until that phase.
        detached = OdePair(pair.x_fake.detach(), pair.x_real.detach(), pair.t_prev,
                           fake_features=[f.detach() for f in fake_features])
        return loss, {"d_fake": logits_fake.detach().mean().item()}, detached

    def discriminator_loss(self, pair: OdePair, batch: PhaseBatch):
        logits_real = self.discriminate(pair.x_real, pair.t_prev, batch)
        logits_fake = self.nets.heads(pair.fake_features)

        def loss_fn(real, fake):
            return hinge_d_loss(real, fake, head_reduction=self.head_reduction)

        loss = loss_fn(logits_real, logits_fake)
        metrics = {"d_real": logits_real.detach().mean().item(), "d_fake": logits_fake.detach().mean().item(),
                   **discriminator_health(logits_real, logits_fake, loss, loss_fn)}
        return loss, metrics, None
