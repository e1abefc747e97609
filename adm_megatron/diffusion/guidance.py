"""Classifier-free guidance with a per-sample guidance scale drawn from a range.

The teacher (real score) is sampled with CFG whose scale is drawn uniformly per sample from a
configured ``[lo, hi]`` (CogVideoX [5, 7], SD3-Medium [6, 8], SD3.5-Large [3, 4]).
:func:`cfg_model_output` runs the conditional and unconditional branches in one batched forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def sample_guidance_scales(
    batch: int,
    scale_range: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample guidance scales [batch] (float32), uniform on ``scale_range = (lo, hi)``."""
    lo, hi = scale_range
    if lo > hi:
        raise ValueError(f"guidance scale range must have lo <= hi, got ({lo}, {hi})")
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(device)


def _concat(uncond: Any, cond: Any) -> Any:
    """Concatenate two conditioning structures leaf-wise along dim 0 (tensor, tuple/list,
    dict, or None)."""
    if uncond is None and cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond], dim=0)
    if isinstance(cond, (tuple, list)):
        if len(uncond) != len(cond):
            raise ValueError(f"cond and uncond differ in length: {len(cond)} vs {len(uncond)}")
        parts = [_concat(u, c) for u, c in zip(uncond, cond)]
        return type(cond)(*parts) if hasattr(cond, "_fields") else type(cond)(parts)  # NamedTuple or not
    if isinstance(cond, dict):
        if uncond.keys() != cond.keys():
            raise ValueError(f"cond and uncond differ in keys: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _concat(uncond[k], cond[k]) for k in cond}
    raise TypeError(f"unsupported conditioning type {type(cond).__name__}")


def cfg_model_output(
    model_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor | float | int,
    cond: Any,
    uncond: Any,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` from ONE call of ``model_fn(x, t, c)`` on the batch
    ``[uncond; cond]``. ``t`` is a scalar or [B]; ``scale`` a float or [B], broadcast per sample;
    the combination runs in at least float32 and returns the model output's dtype."""
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    t = t.expand(batch) if t.dim() == 0 else t
    out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), _concat(uncond, cond))
    out_uncond, out_cond = out.chunk(2, dim=0)
    compute = torch.promote_types(out.dtype, torch.float32)
    scale = torch.as_tensor(scale, device=out.device, dtype=compute)
    if scale.dim() == 1:
        scale = scale.view((batch,) + (1,) * (out.dim() - 1))
    guided = out_uncond.to(compute) + scale * (out_cond.to(compute) - out_uncond.to(compute))
    return guided.to(out.dtype)
