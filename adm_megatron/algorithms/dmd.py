"""The DMD2 baseline: ADM with the distribution-matching generator loss instead of the hinge.

Everything but the generator and discriminator losses is ADM's (same generator sample x̂0 from a
random step, same noisy x_t, same CFG teacher, same fake score, same discriminator on one-step ODE
outputs), so ``distill.method`` is the only switch between the two.

Generator: ``dmd_loss`` pushes x̂0 along (x̂0_fake - x̂0_real) / mean|x̂0 - x̂0_real| (DMD's
normalisation), where x̂0_real / x̂0_fake are the CFG teacher's and the fake score's x0 predictions
at x_t; with ``gan_weight > 0`` DMD2's non-saturating GAN term on D(x_fake) is added and the
discriminator trains with DMD2's softplus loss.
"""

from __future__ import annotations

import torch

from adm_megatron.algorithms.adm import ADM, OdePair, PhaseBatch
from adm_megatron.algorithms.randomness import BatchRandom
from adm_megatron.algorithms.losses import dmd2_gan_d_loss, dmd2_gan_g_loss, dmd_loss


class DMD2(ADM):
    def __init__(self, *args, gan_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gan_weight = gan_weight

    @property
    def uses_discriminator(self) -> bool:
        return self.gan_weight > 0

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        x0_hat = self.generator_x0(batch, rng)
        x_t, t, _ = self.diffuse(x0_hat.detach(), rng, t_min=self.delta_t)
        real_out = self.teacher_velocity(x_t, t, batch, rng)
        x0_real = self.schedule.model_output_to_x0_eps(x_t, real_out, t)[0]
        with torch.no_grad():
            fake_out = self.nets.fake_score(x_t, self.schedule.model_timestep(t), batch.text)
        x0_fake = self.schedule.model_output_to_x0_eps(x_t, fake_out, t)[0]
        loss = dmd_loss(x0_hat, x0_real, x0_fake)
        metrics = {"dmd": loss.detach().item()}
        if not self.uses_discriminator:
            return loss, metrics, None
        pair = self.ode_pair(x0_hat, batch, rng)
        logits_fake = self.discriminate(pair.x_fake, pair.t_prev, batch)
        loss = loss + self.gan_weight * dmd2_gan_g_loss(logits_fake, head_reduction=self.head_reduction)
        metrics["d_fake"] = logits_fake.detach().mean().item()
        return loss, metrics, OdePair(pair.x_fake.detach(), pair.x_real.detach(), pair.t_prev)

    def discriminator_loss(self, pair: OdePair, batch: PhaseBatch):
        logits_real = self.discriminate(pair.x_real, pair.t_prev, batch)
        logits_fake = self.discriminate(pair.x_fake, pair.t_prev, batch)
        loss = dmd2_gan_d_loss(logits_real, logits_fake, head_reduction=self.head_reduction)
        return loss, self._d_metrics(logits_real, logits_fake)
