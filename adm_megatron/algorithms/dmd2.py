"""DMD2 as published (Yin et al., 2024, "Improved Distribution Matching Distillation"; the
authors' code, tianweiy/DMD2): the DMD gradient plus a non-saturating GAN term whose classifier
sits on the *fake score's* intermediate features and sees noisy real vs noisy generated samples.

- fake-score ("guidance") phase: x0 = G(z) (no grad); loss = the fake score's diffusion loss +
  ``cls_weight`` x the classifier loss E[softplus(D(x_fake_t))] + E[softplus(-D(x_real_t))], where
  x_real comes from the real-sample set (teacher ODE-pair x0's, or data latents) with its prompts,
  both noised to t uniform on [0, T·gan_t_max) (``diffusion_gan_max_timestep``), and
  D = heads(fake score's tapped block outputs). The fake score *and* the heads are updated in this
  phase (DMD2 trains the classifier branch with the fake denoiser's features in one optimiser step).
- generator phase: the DMD loss (``dmd.py``) + ``gan_weight`` x E[softplus(-D(x̂0_t))], the
  gradient of the GAN term reaching θ through the frozen fake score's features.
- no separate discriminator phase.

Defaults are the authors' SDXL settings (their train_sdxl_distill scripts): ``gen_cls_loss_weight``
5e-3, ``guidance_cls_loss_weight`` 1e-2, ``diffusion_gan_max_timestep`` 1000 (all of [0, T)),
``min_step_percent`` 0.02 / ``max_step_percent`` 0.98. (Their ImageNet setting uses 3e-3 for the
generator term; they update the fake score 5x per generator update, ``distill.ttur`` here.)
"""

from __future__ import annotations

import torch

from adm_megatron.algorithms.base import PhaseBatch, RealBatch
from adm_megatron.algorithms.discriminator_health import discriminator_health
from adm_megatron.algorithms.dmd import DMD
from adm_megatron.algorithms.losses import dmd2_gan_d_loss, dmd2_gan_g_loss
from adm_megatron.algorithms.randomness import BatchRandom


class DMD2(DMD):
    fake_phase_trains = ("fake_score", "discriminator")
    has_discriminator = True
    needs_real_samples = True

    def __init__(self, *args, gan_weight: float = 5e-3, cls_weight: float = 1e-2, gan_t_max: float = 1.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.gan_weight = gan_weight
        self.cls_weight = cls_weight
        self.gan_t_max = max(1, int(gan_t_max * self.schedule.num_train_timesteps))

    def classify(self, x0: torch.Tensor, text, rng: BatchRandom) -> torch.Tensor:
        """Logits [B, heads] of the classifier on the fake score's features of noised x0."""
        x_t, t, _ = self.diffuse(x0, rng, t_max=self.gan_t_max)
        return self.nets.discriminator(self.nets.fake_score, x_t, self.schedule.model_timestep(t), text)

    def fake_score_loss(self, batch: PhaseBatch, rng: BatchRandom):
        real: RealBatch = batch.real
        if real is None:
            raise ValueError("distill.method=dmd2 needs real samples (data.real_path)")
        x0 = self.sample_generator(batch.fake_noise, batch.cond)
        denoising = self.denoising_loss(x0, batch.cond, rng)
        logits_fake = self.classify(x0, batch.cond, rng)
        logits_real = self.classify(real.x0, real.cond, rng)

        def loss_fn(r, f):
            return dmd2_gan_d_loss(r, f, head_reduction=self.head_reduction)

        cls = loss_fn(logits_real, logits_fake)
        metrics = {"denoising": denoising.detach().item(), "classifier": cls.detach().item(),
                   "discriminator/loss": cls.detach().item(),
                   **discriminator_health(logits_real, logits_fake, cls, loss_fn)}
        return denoising + self.cls_weight * cls, metrics, None

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        x0_hat = self.generator_x0(batch, rng)
        dmd = self.distribution_matching_loss(x0_hat, batch, rng)
        logits = self.classify(x0_hat, batch.cond, rng)
        gan = dmd2_gan_g_loss(logits, head_reduction=self.head_reduction)
        return dmd + self.gan_weight * gan, {"dmd": dmd.detach().item(), "gan": gan.detach().item()}, None
