"""Adversarial Distribution Matching (ADM, Algorithm 1): what each phase computes.

- fake-score phase: x0 = G(z) by the N-step PF-ODE (no grad); the fake score learns the ordinary
  diffusion (velocity) loss on q(x_t | x0), no CFG.
- generator phase: a random n in [1, N]; the ODE rolls from t_N to t_n without grad, one step with
  grad gives x̂0 = G(x_{t_n}, t_n); fresh noise diffuses it to x_t (t uniform, t - Δt >= 0); one
  PF-ODE step of size Δt with the fake score gives x_fake(t - Δt) (gradient reaches θ through x_t
  and the fake model's step, ψ frozen) and one with the CFG teacher gives x_real(t - Δt) (no grad).
  L_G = -E[D(x_fake, t - Δt)] (hinge).
- discriminator phase: L_D = E[max(0, 1 + D(x_fake))] + E[max(0, 1 - D(x_real))] on the detached
  pair of the generator phase of the same iteration (one pair per iteration, as in Algorithm 1).

``DMD2`` (``dmd.py``) subclasses this and changes only the generator and discriminator losses, so
ADM vs DMD2 is one config switch with all sampling code shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.algorithms.losses import diffusion_loss, hinge_d_loss, hinge_g_loss
from adm_megatron.algorithms.networks import Networks
from adm_megatron.algorithms.randomness import BatchRandom
from adm_megatron.diffusion.guidance import cfg_model_output
from adm_megatron.diffusion.rollout import predict_x0, rollout
from adm_megatron.diffusion.schedules import NoiseSchedule


@dataclass
class PhaseBatch:
    """One data-parallel rank's inputs for one iteration, identical on its TP / CP ranks."""

    text: torch.Tensor  # [B, L, D] prompt embeddings
    negative: torch.Tensor  # [B, L, D] the unconditional (negative prompt) embeddings
    noise: torch.Tensor  # [B, F, C, H, W] the generator's starting noise z


@dataclass
class OdePair:
    """The generator phase's one-step ODE outputs at t - Δt, kept for the discriminator phase."""

    x_fake: torch.Tensor  # with grad to the generator in the generator phase
    x_real: torch.Tensor
    t_prev: torch.Tensor


class ADM:
    def __init__(
        self,
        networks: Networks,
        schedule: NoiseSchedule,
        generator_steps: int,
        delta_t: int,
        guidance_scale: tuple[float, float],
        head_reduction: str = "sum",
    ):
        self.nets = networks
        self.schedule = schedule
        self.timesteps = schedule.inference_timesteps(generator_steps)
        self.delta_t = delta_t
        self.guidance_scale = guidance_scale
        self.head_reduction = head_reduction
        if not 0 < delta_t < schedule.num_train_timesteps:
            raise ValueError(
                f"distill.delta_t={delta_t}: expected 0 < delta_t < {schedule.num_train_timesteps}"
            )

    # -- shared sampling ---------------------------------------------------------------------
    def sample_generator(self, batch: PhaseBatch) -> torch.Tensor:
        """x0 = G(z): the generator's full N-step PF-ODE, no grad."""
        return rollout(self.nets.generator, self.schedule, batch.noise, batch.text, self.timesteps)

    def generator_x0(self, batch: PhaseBatch, rng: BatchRandom) -> torch.Tensor:
        """x̂0 from a random intermediate step t_n with grad through that one step only."""
        n_steps = len(self.timesteps)
        n = rng.shared_randint(1, n_steps)
        x_tn = rollout(
            self.nets.generator, self.schedule, batch.noise, batch.text, self.timesteps, stop_index=n
        )
        return predict_x0(self.nets.generator, self.schedule, x_tn, self.timesteps[n_steps - n], batch.text)

    def diffuse(self, x0: torch.Tensor, rng: BatchRandom, t_min: int = 0):
        """x_t ~ q(x_t | x0) with t uniform on [t_min, T) and fresh noise; returns (x_t, t, noise)."""
        t = rng.randint(t_min, self.schedule.num_train_timesteps, x0.device)
        noise = rng.randn(x0)
        return self.schedule.add_noise(x0, noise, t), t, noise

    def teacher_velocity(self, x_t: torch.Tensor, t: torch.Tensor, batch: PhaseBatch, rng: BatchRandom) -> torch.Tensor:
        """The CFG teacher's output, the scale drawn per sample from the configured range."""
        scale = rng.guidance_scales(self.guidance_scale, device=x_t.device)
        with torch.no_grad():
            return cfg_model_output(
                self.nets.teacher, x_t, self.schedule.model_timestep(t), batch.text, batch.negative, scale
            )

    def ode_pair(self, x0_hat: torch.Tensor, batch: PhaseBatch, rng: BatchRandom) -> OdePair:
        x_t, t, _ = self.diffuse(x0_hat, rng, t_min=self.delta_t)
        t_prev = self.schedule.shifted_by(t, self.delta_t)
        model_t = self.schedule.model_timestep(t)
        x_fake = self.schedule.ode_step(x_t, self.nets.fake_score(x_t, model_t, batch.text), t, t_prev)
        real_out = self.teacher_velocity(x_t.detach(), t, batch, rng)
        x_real = self.schedule.ode_step(x_t.detach(), real_out, t, t_prev)
        return OdePair(x_fake=x_fake, x_real=x_real, t_prev=t_prev)

    def discriminate(self, x: torch.Tensor, t: torch.Tensor, batch: PhaseBatch) -> torch.Tensor:
        return self.nets.discriminator(x, self.schedule.model_timestep(t), batch.text)

    # -- the three phases --------------------------------------------------------------------
    def fake_score_loss(self, batch: PhaseBatch, rng: BatchRandom):
        x0 = self.sample_generator(batch)
        x_t, t, noise = self.diffuse(x0, rng)
        pred = self.nets.fake_score(x_t, self.schedule.model_timestep(t), batch.text)
        loss = diffusion_loss(pred, self.schedule.target(x0, noise, t))
        return loss, {}, None

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        pair = self.ode_pair(self.generator_x0(batch, rng), batch, rng)
        logits_fake = self.discriminate(pair.x_fake, pair.t_prev, batch)
        loss = hinge_g_loss(logits_fake, head_reduction=self.head_reduction)
        detached = OdePair(pair.x_fake.detach(), pair.x_real.detach(), pair.t_prev)
        return loss, {"d_fake": logits_fake.detach().mean().item()}, detached

    def discriminator_loss(self, pair: OdePair, batch: PhaseBatch):
        logits_real = self.discriminate(pair.x_real, pair.t_prev, batch)
        logits_fake = self.discriminate(pair.x_fake, pair.t_prev, batch)
        loss = hinge_d_loss(logits_real, logits_fake, head_reduction=self.head_reduction)
        return loss, self._d_metrics(logits_real, logits_fake)

    @staticmethod
    def _d_metrics(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> dict:
        return {
            "d_real": logits_real.detach().mean().item(),
            "d_fake": logits_fake.detach().mean().item(),
        }

    @property
    def uses_discriminator(self) -> bool:
        return True
