"""Distribution Matching Distillation (DMD), the plain baseline: no discriminator at all.

Generator: ``dmd_loss`` pushes x̂0 along (x̂0_fake - x̂0_real) / mean|x̂0 - x̂0_real| (DMD's
normalisation), where x̂0_real / x̂0_fake are the CFG teacher's and the fake score's x0
predictions at x_t, t uniform on [t_lo·T, t_hi·T) (DMD2's ``min_step_percent`` 0.02 and
``max_step_percent`` 0.98 by default). The fake score trains exactly as in ADM, on generator samples
from its own noise z; x̂0 comes from ẑ and a random intermediate step, as in ADM.
"""

from __future__ import annotations

import torch

from adm_megatron.algorithms.base import Distillation, PhaseBatch
from adm_megatron.algorithms.losses import dmd_loss
from adm_megatron.algorithms.randomness import BatchRandom


class DMD(Distillation):
    def __init__(self, *args, dmd_t_range: tuple[float, float] = (0.02, 0.98), **kwargs):
        super().__init__(*args, **kwargs)
        T = self.schedule.num_train_timesteps
        self.dmd_t = (int(dmd_t_range[0] * T), max(int(dmd_t_range[1] * T), int(dmd_t_range[0] * T) + 1))

    def distribution_matching_loss(self, x0_hat: torch.Tensor, batch: PhaseBatch, rng: BatchRandom):
        x_t, t, _ = self.diffuse(x0_hat.detach(), rng, t_min=self.dmd_t[0], t_max=self.dmd_t[1])
        real_out = self.teacher_output(x_t, t, batch, rng)
        x0_real = self.schedule.model_output_to_x0_eps(x_t, real_out, t)[0]
        with torch.no_grad():
            fake_out = self.nets.fake_score(x_t, self.schedule.model_timestep(t), batch.cond)
        x0_fake = self.schedule.model_output_to_x0_eps(x_t, fake_out, t)[0]
        return dmd_loss(x0_hat, x0_real, x0_fake)

    def generator_loss(self, batch: PhaseBatch, rng: BatchRandom):
        loss = self.distribution_matching_loss(self.generator_x0(batch, rng), batch, rng)
        return loss, {"dmd": loss.detach().item()}, None
