"""The few-step generator's sampler: the PF-ODE over its fixed inference timesteps.

``timesteps`` is the generator's schedule ``[t_N, ..., t_1]`` (descending, as
``schedule.inference_timesteps(N)`` gives it); index ``i`` holds ``t_{N - i}`` and ``t_0`` is
the clean end. ``model_fn(x_t, t, cond)`` receives ``schedule.model_timestep(t)`` of shape [B].
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .schedules import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _model_out(
    model_fn: ModelFn, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, cond: Any
) -> torch.Tensor:
    # the schedule's timesteps live on the CPU; the model's time embedding runs where x_t is
    t = torch.as_tensor(t, device=x_t.device)
    return model_fn(x_t, schedule.model_timestep(t).expand(x_t.shape[0]), cond)


def rollout(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    timesteps: torch.Tensor,
    stop_index: int | None = None,
    grad: bool = False,
    start_index: int | None = None,
) -> torch.Tensor:
    """Run the PF-ODE from ``t_start`` down to ``t_stop`` and return the sample there.

    ``x_T`` is the sample at ``t_{start_index}`` (default N: pure noise). ``stop_index=n``
    stops when the sample is at ``t_n`` (``None`` or 0: run to the clean end). Rolling to ``n``
    and then from ``start_index=n`` equals one full rollout. Without ``grad`` no graph is built.
    """
    n_steps = len(timesteps)
    start = n_steps if start_index is None else start_index
    stop = 0 if stop_index is None else stop_index
    if not 0 <= stop <= start <= n_steps:
        raise ValueError(f"need 0 <= stop_index <= start_index <= {n_steps}, got {stop}, {start}")
    prev = schedule.previous_timesteps(timesteps)
    x = x_T
    with torch.set_grad_enabled(grad):
        for i in range(n_steps - start, n_steps - stop):
            out = _model_out(model_fn, schedule, x, timesteps[i], cond)
            x = schedule.ode_step(x, out, timesteps[i], prev[i])
    return x


def predict_x0(
    model_fn: ModelFn, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor | float | int, cond: Any
) -> torch.Tensor:
    """The one-step estimate ``x0_hat = G(x_t, t)`` (grad follows the caller's mode)."""
    t = torch.as_tensor(t, device=x_t.device)
    return schedule.model_output_to_x0_eps(x_t, _model_out(model_fn, schedule, x_t, t, cond), t)[0]
