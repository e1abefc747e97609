r"""Adversarial Distillation Pretraining (ADP, the first stage of the paper's 1-step "DMDX" recipe).

Data: teacher ODE pairs (x_T, x_0, prompt) from ``data.real_path`` (``adm-megatron collect-ode``):
x_T is the noise the teacher's multi-step CFG PF-ODE started from, x_0 where it ended.

Time and input (rectified flow on the pair)
-------------------------------------------
The generator's time is drawn as ``u ~ U[0, 1)`` and warped to the RF time ``s = 1 - u^3``
(``t <- (1 - (t/T)^3) T`` of the paper with ``s = t/T``), so most updates sit near pure noise,
where a 1-step generator is used. Every schedule writes its forward process as
``x_t = alpha(t) x_0 + sigma(t) eps`` and so reads as a scaled RF interpolation,
``x_t = (alpha + sigma) ((1 - s) x_0 + s eps)`` with ``s = sigma / (alpha + sigma)``
(:meth:`NoiseSchedule.rf_time`). ADP puts the pair's own x_T in the place of eps:

* **flow matching** (SD3 / SD3.5): ``alpha + sigma = 1`` and ``s = sigma = t / T``, so the model
  timestep is ``s T`` (float), the input is exactly ``(1 - s) x_0 + s x_T``, and the model's output
  *is* the RF velocity ``x_T - x_0`` (its x0 reading is ``x_t - s v``);
* **VP v-prediction** (CogVideoX, the toy): the model timestep is the integer grid timestep whose
  RF time is nearest ``s`` (:meth:`VPVPredSchedule.timestep_at_rf_time`); the input is that
  timestep's own marginal point ``alpha x_0 + sigma x_T`` (the RF interpolation at the grid's ``s``,
  scaled by ``alpha + sigma`` so the model sees the variance it was trained on). The output ``v`` is
  read as the schedule reads it: ``x0_hat = alpha x_t - sigma v``, ``eps_hat = sigma x_t + alpha v``,
  and its RF velocity is ``eps_hat - x0_hat`` (equal to ``x_T - x_0`` exactly when ``v`` is the
  schedule's velocity target of the pair).

Both readings go through the schedule objects (``add_noise``, ``model_output_to_x0_eps``), the same
ones the N-step sampler (``diffusion/rollout.py``) and diffusers' schedulers use, so a generator
trained here is sampled consistently afterwards: at N = 1 the sampler's only step is at the first
inference timestep (VP 'trailing': t = T - 1, where zero terminal SNR gives alpha = 0, s = 1, input
= x_T, ``x0_hat = -v``; flow: s = 1), the very point the warp favours; an ADM stage 2 or the
exported pipeline then reads the output the same way.

``pure_noise_share`` (``distill.pure_noise_share``, default 0) puts that share of the samples at
s = 1 instead of the warp's draw. The warp reaches s = 1 rarely (on the toy's VP grid 4.9% of the
draws; never, in measure, on the continuous flow time), and elsewhere the input carries the pair's
own x_0. With a zero-terminal-SNR teacher the teacher-initialised output at s = 1 ignores x_T (the
conditional mean) while near-copies come out everywhere else, so a discriminator hunting the few
collapsed fakes stays at chance; docs/toy_study.md measures the share's effect.

The losses (hinge, as ADM's)
----------------------------
The generator's sample is ``x0_hat``. No regression term: the paper replaces DMD2's MSE
pre-training on ODE pairs by a distributional (adversarial) loss, so the pair's velocity is the
target only in the sense that its ends are the real side and the generator's input.

* latent discriminator (weight ``latent_weight`` = λ1, 0.85): the frozen teacher backbone's tapped
  features plus the trainable 3D heads, on ``x0_hat`` and on the pair's real ``x_0``, each re-noised
  to the same ``t'`` uniform on [0, T) (``q(x_t' | x_0)`` of the schedule; the
  paper's choice). ``disc_t_max`` < 1 narrows it to [0, disc_t_max T) (``distill.gan_t_max``, the
  knob DMD2's classifier has too; the toy study's note says when that matters). The re-noising
  noise is ``renoise`` (``distill.renoise``):

  - ``independent`` (the default): each side its own draw;
  - ``shared``: one fresh draw for both, so a real / fake pair differs only by
    ``alpha(t') (x_0 - x0_hat)`` -- the pair's x_0 and the generator's sample from that pair's own
    interpolation, as ADM's real and fake share x_t. A variance reduction of the discriminator's
    input, not a change of its target: each side's marginal is still ``q(x_t' | .)``;
  - ``pair``: that one draw is the pair's own x_T, so the real side is the point at t' on the pair's
    line from x_T to x_0 (the family the generator's inputs come from) and the fake side the point
    on the line from the same x_T to x0_hat. The discriminator then sees which clean end goes with
    which noise, so its gradient on a fake differs with that fake's x_T. A hinge loss on samples
    alone cannot give that: from a collapsed start (a zero-terminal-SNR teacher's 1-step output is
    its conditional mean, whatever x_T) every fake gets the same push up to the re-noising noise,
    and the samples move together, not apart (docs/toy_study.md measures it);

* pixel discriminator (weight ``pixel_weight`` = λ2, 0.15; ``heads/pixel.py``): the VAE-decoded
  clean samples (each video frame as an image) through a frozen vision encoder (SAM by default,
  DINOv2 as the ablation) and trainable 2D heads on its configured layers; per-frame logits are
  averaged over the frames of a sample. With λ2 = 0 the branch is not even built: no VAE decode,
  no encoder forward.

``L_G = -λ1 E[D_lat(x0_hat_t')] - λ2 E[D_pix(x0_hat)]`` and
``L_D = λ1 hinge_D(D_lat(x_0,t'), D_lat(x0_hat_t')) + λ2 hinge_D(D_pix(x_0), D_pix(x0_hat))`` on the
detached pair of the generator phase of the same iteration. As in ADM, the frozen feature
extractors' outputs on the fake side are computed once, in the generator phase, and reused.

No fake score: ADP has none; the trainer builds none and runs no fake-score phase
(``fake_phase_trains`` is empty). The teacher is used only as the latent discriminator's backbone
(no CFG at training time; the pairs carry the teacher's guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.algorithms.base import Distillation, PhaseBatch, RealBatch
from adm_megatron.algorithms.discriminator_health import discriminator_health
from adm_megatron.algorithms.losses import hinge_d_loss, hinge_g_loss
from adm_megatron.algorithms.randomness import BatchRandom
from adm_megatron.config import CHOICES


RENOISE = CHOICES["distill.renoise"]  # independent, shared, pair


def warp_rf_time(u: torch.Tensor) -> torch.Tensor:
    """ADP's generator-time warp ``s = 1 - u^3`` (``t <- (1 - (t/T)^3) T`` with ``s = t / T``)."""
    return 1.0 - u.pow(3)


@dataclass
class AdpPair:
    """The generator phase's fake side (detached) and the real side, kept for the discriminator."""

    t_disc: torch.Tensor  # t' of the latent discriminator
    real_noisy: torch.Tensor  # real x_0 re-noised to t'
    text: torch.Tensor  # the prompts as the networks take them (a TextCondition with a pooled embedding)
    real_x0: torch.Tensor
    fake_latent_features: list[torch.Tensor]  # the teacher backbone's features of x0_hat at t'
    fake_pixel_features: list[torch.Tensor] | None  # the vision encoder's features of decoded x0_hat


class ADP(Distillation):
    fake_phase_trains = ()  # no fake score at all
    discriminator_phase = True
    has_discriminator = True
    needs_real_samples = True

    def __init__(self, *args, latent_weight: float = 0.85, pixel_weight: float = 0.15, disc_t_max: float = 1.0,
                 renoise: str = "independent", pure_noise_share: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if (pixel_weight > 0) != (self.nets.pixel is not None):
            raise ValueError(f"ADP: pixel_weight={pixel_weight} but the pixel discriminator is "
                             f"{'missing' if self.nets.pixel is None else 'built'}")
        self.latent_weight = latent_weight
        self.pixel_weight = pixel_weight
        self.disc_t_max = max(1, int(disc_t_max * self.schedule.num_train_timesteps))
        if renoise not in RENOISE:
            raise ValueError(f"ADP: renoise={renoise!r}, expected one of {', '.join(RENOISE)}")
        self.renoise = renoise
        self.pure_noise_share = pure_noise_share

    @staticmethod
    def _pairs(batch: PhaseBatch) -> RealBatch:
        if batch.real is None or batch.real.x_T is None:
            raise ValueError("distill.method=adp needs teacher ODE pairs (x_T, x_0) from data.real_path")
        return batch.real

    def generator_input(self, x_T: torch.Tensor, x0: torch.Tensor, rng: BatchRandom):
        """(x_t, t): the pair's RF interpolation at the warped time, as the schedule's timestep t; a
        ``pure_noise_share`` of the samples at s = 1 (x_t = x_T) instead. The extra draw is made only
        when the share is set, so runs without it draw exactly what they always drew."""
        s = warp_rf_time(rng.rand(x0.device))
        if self.pure_noise_share > 0:
            s = torch.where(rng.rand(x0.device) < self.pure_noise_share, torch.ones_like(s), s)
        t = self.schedule.timestep_at_rf_time(s)
        return self.schedule.add_noise(x0, x_T, t), t

    def generator_sample(self, x_T: torch.Tensor, x0: torch.Tensor, text: torch.Tensor, rng: BatchRandom):
        """x0_hat of the generator at the pair's interpolation (with grad)."""
        x_t, t = self.generator_input(x_T, x0, rng)
        out = self.nets.generator(x_t, self.schedule.model_timestep(t), text)
        x0_hat, _ = self.schedule.model_output_to_x0_eps(x_t, out, t)
        return x0_hat

    def latent_features(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        return self.nets.teacher.features(x, self.schedule.model_timestep(t), text, self.nets.head_every)

    def _heads(self, features: list[torch.Tensor], branch: str) -> torch.Tensor:
        return self.nets.heads(features, branch=branch)

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        real = self._pairs(batch)
        x0_hat = self.generator_sample(real.x_T, real.x0, real.cond, rng)
        t_disc = rng.randint(0, self.disc_t_max, x0_hat.device)
        fake_noise = real.x_T if self.renoise == "pair" else rng.randn(x0_hat)
        real_noise = rng.randn(real.x0) if self.renoise == "independent" else fake_noise
        fake_noisy = self.schedule.add_noise(x0_hat, fake_noise, t_disc)
        real_noisy = self.schedule.add_noise(real.x0, real_noise, t_disc)
        latent_features = self.latent_features(fake_noisy, t_disc, real.cond)
        logits = self._heads(latent_features, "latent")
        latent = hinge_g_loss(logits, head_reduction=self.head_reduction)
        loss = self.latent_weight * latent
        metrics = {"latent": latent.detach().item(), "d_fake": logits.detach().mean().item()}
        pixel_features = None
        if self.pixel_weight > 0:
            pixel_features = self.nets.pixel.features(x0_hat)
            pixel = hinge_g_loss(self._pixel_logits(pixel_features, x0_hat.shape[0]),
                                 head_reduction=self.head_reduction)
            loss = loss + self.pixel_weight * pixel
            metrics["pixel"] = pixel.detach().item()
            pixel_features = [f.detach() for f in pixel_features]
        # Reusing the fake side's features in the discriminator phase is exact: the teacher
        # backbone, the VAE and the vision encoder are frozen for the whole run and their inputs
        # are these very (detached) values; the heads, which change, are applied afresh there.
        pair = AdpPair(t_disc=t_disc, real_noisy=real_noisy, text=real.cond, real_x0=real.x0,
                       fake_latent_features=[f.detach() for f in latent_features],
                       fake_pixel_features=pixel_features)
        return loss, metrics, pair

    def _pixel_logits(self, features: list[torch.Tensor], batch: int) -> torch.Tensor:
        """[B, heads]: the pixel heads' per-frame logits averaged over each sample's frames."""
        per_frame = self._heads(features, "pixel")
        return per_frame.view(batch, -1, per_frame.shape[-1]).mean(dim=1)

    def discriminator_loss(self, pair: AdpPair, batch: PhaseBatch):
        def loss_fn(real, fake):
            return hinge_d_loss(real, fake, head_reduction=self.head_reduction)

        with torch.no_grad():
            real_features = self.latent_features(pair.real_noisy, pair.t_disc, pair.text)
        logits_real = self._heads(real_features, "latent")
        logits_fake = self._heads(pair.fake_latent_features, "latent")
        latent = loss_fn(logits_real, logits_fake)
        loss = self.latent_weight * latent
        metrics = {"d_real": logits_real.detach().mean().item(), "d_fake": logits_fake.detach().mean().item(),
                   "latent": latent.detach().item(),
                   **discriminator_health(logits_real, logits_fake, latent, loss_fn)}
        if self.pixel_weight > 0:
            batch_size = pair.real_x0.shape[0]
            with torch.no_grad():
                real_pixel_features = self.nets.pixel.features(pair.real_x0)
            pixel_real = self._pixel_logits(real_pixel_features, batch_size)
            pixel_fake = self._pixel_logits(pair.fake_pixel_features, batch_size)
            pixel = loss_fn(pixel_real, pixel_fake)
            loss = loss + self.pixel_weight * pixel
            metrics.update({"pixel": pixel.detach().item(), "pixel_d_real": pixel_real.detach().mean().item(),
                            "pixel_d_fake": pixel_fake.detach().mean().item()})
        return loss, metrics, None
