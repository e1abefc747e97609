"""What every distillation method shares: the batch, the generator's sampling and the fake score.

A method (ADM, DMD, DMD2, ADP) is one object with three phase functions the trainer calls:
``fake_score_loss(batch, rng)``, ``generator_loss(batch, rng)`` and
``discriminator_loss(pair, batch)``, each returning ``(loss, metrics, extra)``. Algorithm 1 draws
the generator's starting noise twice, independently: z for the fake-score phase (line 8) and ẑ
for the generator phase (line 15); :class:`PhaseBatch` carries both, drawn from separate seeded
streams by the trainer.

Which networks each phase trains is the method's to say (``fake_phase_trains``, empty for a method
without a fake score, ``discriminator_phase``); the trainer runs them without knowing the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adm_megatron.algorithms.losses import diffusion_loss
from adm_megatron.algorithms.networks import Networks, text_condition
from adm_megatron.algorithms.randomness import BatchRandom
from adm_megatron.diffusion.guidance import cfg_model_output
from adm_megatron.diffusion.rollout import predict_x0, rollout
from adm_megatron.diffusion.schedules import NoiseSchedule


@dataclass
class RealBatch:
    """Samples of the target distribution (teacher ODE-pair x0's) and their prompts."""

    x0: torch.Tensor  # [B, F, C, H, W] (video) or [B, C, H, W] (image)
    text: torch.Tensor  # [B, L, D]
    x_T: torch.Tensor | None = None  # the ODE pair's starting noise (ADP's generator input)
    pooled: torch.Tensor | None = None  # [B, Dp] pooled text embedding (SD3); None for families without

    @property
    def cond(self):
        """What the networks are conditioned on (see ``networks.text_condition``)."""
        return text_condition(self.text, self.pooled)


@dataclass
class PhaseBatch:
    """One data-parallel rank's inputs for one iteration, identical on its TP / CP ranks."""

    text: torch.Tensor  # [B, L, D] prompt embeddings
    negative: torch.Tensor  # [B, L, D] the unconditional (negative prompt) embeddings
    fake_noise: torch.Tensor  # [B, F, C, H, W] or [B, C, H, W] z: the fake-score phase's generator sample starts here
    generator_noise: torch.Tensor  # ẑ: the generator phase's, drawn independently of z
    real: RealBatch | None = None  # only for methods that read real samples (DMD2, ADP)
    pooled: torch.Tensor | None = None  # [B, Dp] pooled text embeddings (SD3); None for families without
    negative_pooled: torch.Tensor | None = None  # [B, Dp] the negative prompt's

    @property
    def cond(self):
        """The prompts as the networks take them (see ``networks.text_condition``)."""
        return text_condition(self.text, self.pooled)

    @property
    def uncond(self):
        """The negative prompts as the networks take them (CFG's unconditional input)."""
        return text_condition(self.negative, self.negative_pooled)


class Distillation:
    """The sampling all methods share; subclasses define the generator and discriminator losses."""

    fake_phase_trains: tuple[str, ...] = ("fake_score",)  # networks updated in the fake-score phase
    discriminator_phase: bool = False  # whether a discriminator phase follows the generator phase
    has_discriminator: bool = False  # whether the run holds discriminator heads at all
    needs_real_samples: bool = False  # whether PhaseBatch.real must be given (data.real_path)

    def __init__(self, networks: Networks, schedule: NoiseSchedule, generator_steps: int,
                 guidance_scale: tuple[float, float], head_reduction: str = "sum"):
        self.nets = networks
        self.schedule = schedule
        self.timesteps = schedule.inference_timesteps(generator_steps)
        self.guidance_scale = guidance_scale
        self.head_reduction = head_reduction

    def sample_generator(self, noise: torch.Tensor, text) -> torch.Tensor:
        """x0 = G(z): the generator's full N-step PF-ODE, no grad."""
        return rollout(self.nets.generator, self.schedule, noise, text, self.timesteps)

    def generator_x0(self, batch: PhaseBatch, rng: BatchRandom) -> torch.Tensor:
        """x̂0 from ẑ and a random intermediate step t_n, with grad through that one step only."""
        n_steps = len(self.timesteps)
        n = rng.shared_randint(1, n_steps)
        x_tn = rollout(self.nets.generator, self.schedule, batch.generator_noise, batch.cond, self.timesteps,
                       stop_index=n)
        return predict_x0(self.nets.generator, self.schedule, x_tn, self.timesteps[n_steps - n], batch.cond)

    def diffuse(self, x0: torch.Tensor, rng: BatchRandom, t_min: int = 0, t_max: int | None = None):
        """x_t ~ q(x_t | x0) with t uniform on [t_min, t_max) (default T) and fresh noise;
        returns (x_t, t, noise)."""
        t = rng.randint(t_min, t_max or self.schedule.num_train_timesteps, x0.device)
        noise = rng.randn(x0)
        return self.schedule.add_noise(x0, noise, t), t, noise

    def teacher_output(self, x_t: torch.Tensor, t: torch.Tensor, batch: PhaseBatch, rng: BatchRandom) -> torch.Tensor:
        """The CFG teacher's output (no grad), the scale drawn per sample from the configured range."""
        scale = rng.guidance_scales(self.guidance_scale, device=x_t.device)
        with torch.no_grad():
            return cfg_model_output(
                self.nets.teacher, x_t, self.schedule.model_timestep(t), batch.cond, batch.uncond, scale
            )

    def denoising_loss(self, x0: torch.Tensor, text, rng: BatchRandom) -> torch.Tensor:
        """The fake score's diffusion loss on q(x_t | x0) (velocity / noise target), no CFG."""
        x_t, t, noise = self.diffuse(x0, rng)
        pred = self.nets.fake_score(x_t, self.schedule.model_timestep(t), text)
        return diffusion_loss(pred, self.schedule.target(x0, noise, t))

    def fake_score_loss(self, batch: PhaseBatch, rng: BatchRandom):
        x0 = self.sample_generator(batch.fake_noise, batch.cond)
        return self.denoising_loss(x0, batch.cond, rng), {}, None

    def discriminator_loss(self, pair, batch: PhaseBatch):
        raise NotImplementedError(f"{type(self).__name__} has no discriminator phase")
