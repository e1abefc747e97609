"""Noise schedules: the forward process, model-output conversions and the PF-ODE step.

Two schedules share one interface (:class:`NoiseSchedule`):

* :class:`VPVPredSchedule` -- CogVideoX: variance-preserving, v-prediction, SNR shift,
  zero-terminal-SNR rescale, 'trailing' spacing; equals diffusers' ``CogVideoXDDIMScheduler``.
* :class:`FlowMatchSchedule` -- SD3 / SD3.5: rectified flow with a shift; equals diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (static shift).

Conventions. A timestep ``t`` is what the schedule's model takes as its time input: an integer
in ``[0, T)`` for VP (``-1`` stands for "past the last step", the DDIM final alpha), the float
``sigma * T`` for flow. Every per-sample ``t`` has shape ``[B]`` (a scalar is broadcast) and is
broadcast over latent dims of any rank. Both schedules write the forward process as
``x_t = alpha(t) x0 + sigma(t) eps`` and both models predict a velocity. Coefficients are
computed in float64; tensor arithmetic runs in at least float32 and the result has the dtype of
the sample given.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import numpy as np
import torch

Coeffs = tuple[torch.Tensor, torch.Tensor]


def _batch_t(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` as a tensor of shape [batch] on ``device`` (a scalar is broadcast)."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    return t


def _lincomb(x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """``cx * x + cy * y`` with per-sample float64 coefficients [B], in the dtype of ``x``."""
    compute = torch.promote_types(x.dtype, torch.float32)
    view = (-1,) + (1,) * (x.dim() - 1)
    cx = cx.to(device=x.device, dtype=compute).view(view)
    cy = cy.to(device=x.device, dtype=compute).view(view)
    return (cx * x.to(compute) + cy * y.to(compute)).to(x.dtype)


def _resolve_config(
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    required: Mapping[str, Any],
    inert: set[str],
    cls: str,
) -> dict[str, Any]:
    """``defaults`` (diffusers' constructor defaults) updated by ``config``; a one-line
    ValueError names the first key this schedule cannot honour. Keys starting with ``_`` and
    ``inert`` keys (which the matched diffusers code path never reads) are ignored."""
    merged = dict(defaults)
    for key, value in config.items():
        if key.startswith("_") or key in inert:
            continue
        if key not in defaults:
            raise ValueError(f"{cls}: unsupported diffusers scheduler config key {key!r}")
        merged[key] = value
    for key, value in required.items():
        if merged[key] != value:
            raise ValueError(f"{cls}: unsupported {key}={merged[key]!r} (supported: {value!r})")
    return merged


class NoiseSchedule(abc.ABC):
    """The interface the trainer uses; subclasses define the three coefficient maps."""

    num_train_timesteps: int

    # -- what a subclass defines -------------------------------------------------------------
    @abc.abstractmethod
    def coefficients(self, t: torch.Tensor) -> Coeffs:
        """``(alpha, sigma)`` of ``x_t = alpha x0 + sigma eps``, float64 of ``t``'s shape."""

    @abc.abstractmethod
    def _prediction_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(p, q, r, w)`` with ``x0 = p x_t + q out`` and ``eps = r x_t + w out``."""

    @abc.abstractmethod
    def _target_coefficients(self, t: torch.Tensor) -> Coeffs:
        """``(c_x0, c_eps)`` with ``target = c_x0 x0 + c_eps eps``."""

    @abc.abstractmethod
    def inference_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The N model timesteps ``t_N .. t_1``, descending, as diffusers' ``set_timesteps``."""

    @abc.abstractmethod
    def previous_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """For each of ``inference_timesteps(N)`` the timestep its ODE step lands on."""

    @abc.abstractmethod
    def sample_training_timesteps(
        self, batch: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Timesteps [batch] for the diffusion training loss, uniform over the training grid."""

    @abc.abstractmethod
    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype the model's time embedding takes."""

    # -- the shared algebra ------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """Sample ``q(x_t | x0)`` with the given noise."""
        alpha, sigma = self.coefficients(_batch_t(t, x0.shape[0], x0.device))
        return _lincomb(x0, noise, alpha, sigma)

    def model_output_to_x0_eps(
        self, x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor | float | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` implied by the model's velocity at ``(x_t, t)``."""
        p, q, r, w = self._prediction_coefficients(_batch_t(t, x_t.shape[0], x_t.device))
        return _lincomb(x_t, model_out, p, q), _lincomb(x_t, model_out, r, w)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """The regression target (velocity) of the diffusion training loss."""
        c_x0, c_eps = self._target_coefficients(_batch_t(t, x0.shape[0], x0.device))
        return _lincomb(x0, noise, c_x0, c_eps)

    def ode_step(
        self,
        x_t: torch.Tensor,
        model_out: torch.Tensor,
        t: torch.Tensor | float | int,
        t_prev: torch.Tensor | float | int,
    ) -> torch.Tensor:
        """Deterministic PF-ODE step from ``t`` to ``t_prev``: ``alpha' x0_hat + sigma' eps_hat``.

        That is DDIM (eta = 0) for VP and the Euler step ``x + (sigma' - sigma) v`` for flow.
        """
        batch, device = x_t.shape[0], x_t.device
        p, q, r, w = self._prediction_coefficients(_batch_t(t, batch, device))
        alpha, sigma = self.coefficients(_batch_t(t_prev, batch, device))
        return _lincomb(x_t, model_out, alpha * p + sigma * r, alpha * q + sigma * w)

    def shifted_by(self, t: torch.Tensor, delta: float | int) -> torch.Tensor:
        """``t - delta`` clamped at 0; ``delta`` is in the units of ``t``."""
        return torch.clamp(t - delta, min=0)

    # -- the rectified-flow reading (ADP) -----------------------------------------------------
    def rf_time(self, t: torch.Tensor) -> torch.Tensor:
        """The rectified-flow time ``s = sigma / (alpha + sigma)`` of timestep ``t`` (float64).

        ``x_t = alpha x0 + sigma eps = (alpha + sigma) ((1 - s) x0 + s eps)``: every point of the
        forward process is the RF interpolation at ``s``, scaled by ``alpha + sigma`` (1 for flow).
        """
        alpha, sigma = self.coefficients(t)
        return sigma / (alpha + sigma)

    @abc.abstractmethod
    def timestep_at_rf_time(self, s: torch.Tensor) -> torch.Tensor:
        """The model timestep whose :meth:`rf_time` is ``s`` (in [0, 1]), or, on a discrete grid,
        the grid timestep with the nearest one."""


class VPVPredSchedule(NoiseSchedule):
    """CogVideoX's variance-preserving v-prediction schedule (``CogVideoXDDIMScheduler``).

    ``alpha_bar`` is built as diffusers does, in float64: ``scaled_linear`` betas, cumprod, the
    SNR shift ``ab / (s + (1 - s) ab)``, then (optionally) the zero-terminal-SNR rescale. The
    step into ``t_prev < 0`` uses ``final_alpha_cumprod`` (1, or ``alpha_bar[0]`` when
    ``set_alpha_to_one`` is false). Inference timesteps use 'trailing' spacing; as in diffusers,
    the step from ``t`` lands on ``t - T // N`` (the next listed timestep when N divides T).
    """

    def __init__(
        self,
        snr_shift_scale: float = 3.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        rescale_betas_zero_snr: bool = True,
        set_alpha_to_one: bool = True,
    ):
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        ab = torch.cumprod(1.0 - betas, dim=0)
        ab = ab / (snr_shift_scale + (1 - snr_shift_scale) * ab)
        if rescale_betas_zero_snr:
            sqrt_ab = ab.sqrt()
            first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
            ab = ((sqrt_ab - last) * (first / (first - last))) ** 2
        self.alphas_cumprod = ab
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else ab[0].item()
        self._tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VPVPredSchedule":
        """Build from a ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` config dict."""
        defaults = {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "set_alpha_to_one": True,
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False,
            "snr_shift_scale": 3.0,
        }
        required = {
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        }
        # Read by neither CogVideoX scheduler's deterministic step nor by 'trailing' spacing.
        inert = {"clip_sample", "clip_sample_range", "sample_max_value", "steps_offset"}
        merged = _resolve_config(config, defaults, required, inert, cls.__name__)
        return cls(**{k: v for k, v in merged.items() if k not in required})

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            raise TypeError(f"VPVPredSchedule timesteps are integers, got dtype {t.dtype}")
        if t.device not in self._tables:
            self._tables[t.device] = self.alphas_cumprod.to(t.device)
        ab = self._tables[t.device][t.clamp(min=0)]
        return torch.where(t >= 0, ab, torch.full_like(ab, self.final_alpha_cumprod))

    def coefficients(self, t: torch.Tensor) -> Coeffs:
        ab = self._alpha_bar(t)
        return ab.sqrt(), (1.0 - ab).sqrt()

    def _prediction_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        alpha, sigma = self.coefficients(t)
        return alpha, -sigma, sigma, alpha

    def _target_coefficients(self, t: torch.Tensor) -> Coeffs:
        alpha, sigma = self.coefficients(t)
        return -sigma, alpha

    def inference_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        ratio = self.num_train_timesteps / num_steps
        timesteps = np.round(np.arange(self.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
        return torch.from_numpy(timesteps).to(device)

    def previous_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps - self.num_train_timesteps // len(timesteps)

    def sample_training_timesteps(
        self, batch: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=generator.device)
        return t.to(device)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t.long()

    def timestep_at_rf_time(self, s: torch.Tensor) -> torch.Tensor:
        # rf_time grows with t on the grid (sigma up, alpha down), so the nearest grid point is a
        # searchsorted neighbour
        grid = self.rf_time(torch.arange(self.num_train_timesteps, device=s.device))
        s = s.to(torch.float64)
        hi = torch.searchsorted(grid, s).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        nearer_lo = (s - grid[lo]).abs() <= (grid[hi] - s).abs()
        return torch.where(nearer_lo, lo, hi)

    def shifted_by(self, t: torch.Tensor, delta: float | int) -> torch.Tensor:
        if delta != int(delta):
            raise ValueError(f"VPVPredSchedule timesteps are integers; delta must be integral, got {delta}")
        return super().shifted_by(t, int(delta))


class FlowMatchSchedule(NoiseSchedule):
    """SD3 / SD3.5 rectified flow: ``x = (1 - s) x0 + s eps``, ``v = eps - x0``, ``t = s T``.

    ``shift`` maps a uniform ``u`` to ``s = shift u / (1 + (shift - 1) u)``. The inference
    sigmas reproduce ``FlowMatchEulerDiscreteScheduler.set_timesteps`` exactly: a linspace from
    ``T`` to ``T sigma_min`` (``sigma_min`` being the *shifted* last training sigma, computed in
    float32), shifted once more, cast to float32; the last step goes to ``s = 0``.
    """

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        # The ends of diffusers' float32 training grid (its sigma_max / sigma_min).
        ends = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
        ends = self._apply_shift(ends)
        self._sigma_max, self._sigma_min = ends.tolist()

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "FlowMatchSchedule":
        """Build from a ``FlowMatchEulerDiscreteScheduler`` config dict (static shift only)."""
        required = {
            "use_dynamic_shifting": False,
            "invert_sigmas": False,
            "shift_terminal": None,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "stochastic_sampling": False,
        }
        defaults = {"num_train_timesteps": 1000, "shift": 1.0, **required}
        # Only read when use_dynamic_shifting is on.
        inert = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}
        merged = _resolve_config(config, defaults, required, inert, cls.__name__)
        return cls(shift=merged["shift"], num_train_timesteps=merged["num_train_timesteps"])

    def _apply_shift(self, u):
        """``shift u / (1 + (shift - 1) u)`` on a tensor or array, in its own dtype."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) / self.num_train_timesteps

    def coefficients(self, t: torch.Tensor) -> Coeffs:
        sigma = self._sigma(t)
        return 1.0 - sigma, sigma

    def _prediction_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sigma = self._sigma(t)
        one = torch.ones_like(sigma)
        return one, -sigma, one, 1.0 - sigma

    def _target_coefficients(self, t: torch.Tensor) -> Coeffs:
        one = torch.ones_like(self._sigma(t))
        return -one, one

    def inference_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        u = np.linspace(self._sigma_max * T, self._sigma_min * T, num_steps) / T
        sigmas = torch.from_numpy(self._apply_shift(u)).to(torch.float32)
        return (sigmas * T).to(device)

    def previous_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.cat([timesteps[1:], timesteps.new_zeros(1)])

    def sample_training_timesteps(
        self, batch: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``T shift(u)`` with ``u`` uniform on (0, 1]: the continuum of diffusers' training grid
        ``T shift(i / T)``, ``i = 1..T`` (SD3 training indexes that grid uniformly)."""
        u = 1.0 - torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
        return (self._apply_shift(u) * self.num_train_timesteps).to(device=device, dtype=torch.float32)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32)

    def timestep_at_rf_time(self, s: torch.Tensor) -> torch.Tensor:
        return (s.to(torch.float64) * self.num_train_timesteps).to(torch.float32)


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Pick the schedule by the config's ``_class_name`` (as in ``scheduler_config.json``)."""
    name = config.get("_class_name")
    if name in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        return VPVPredSchedule.from_diffusers_config(config)
    if name == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchSchedule.from_diffusers_config(config)
    raise ValueError(f"unsupported diffusers scheduler _class_name {name!r}")
