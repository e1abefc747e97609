"""FP8 through Transformer Engine: ``model.fp8`` (``hybrid`` or ``e4m3``) and its delayed-scaling
recipe options (``model.fp8_margin``, ``model.fp8_amax_history_len``, ``model.fp8_amax_compute_algo``,
as TE's ``DelayedScaling``).

The recipe is megatron-core's: ``enable_fp8`` writes the options into the model's
``TransformerConfig`` fields of the same names (``fp8``, ``fp8_recipe='delayed'``, ...), and the DiT
backbones run their blocks inside ``megatron.core.fp8_utils.get_fp8_context(config)``, which is
``transformer_engine.pytorch.fp8_autocast`` with that recipe (``TEDelayedScaling``) and the amax
reduction group of the parallel layout; with ``config.fp8`` unset, or without TE, it is a null
context. The whole block loop is one context, as megatron's ``TransformerBlock`` does for delayed
scaling (entering it per block would reduce amaxes per block). Only TE's linears compute in FP8:
``check_fp8`` refuses, in one line and before anything is built, FP8 where that cannot happen
(the local spec, no TE, no CUDA or a card below compute capability 8.9). The other values of
``model.fp8`` (``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``) are torchao's recipes in the local
spec's linears (``models/fp8_torchao.py``): neither function here acts on them.
"""

from __future__ import annotations

import torch

from adm_megatron.config import FP8_TE_RECIPES

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later: the first cards with FP8 tensor cores


def check_fp8(fp8: str | None, spec: str, capability: tuple[int, int] | None) -> None:
    """One-line ValueError when ``model.fp8`` (a Transformer Engine recipe) cannot run: ``spec`` is the
    block spec the run builds ('te' or 'local'), ``capability`` the CUDA card's compute capability (None
    without CUDA)."""
    if fp8 not in FP8_TE_RECIPES:
        return
    if spec != "te":
        raise ValueError(f"model.fp8={fp8}: FP8 runs in Transformer Engine's linears, and this run builds the local "
                         "spec (model.impl=local, or Transformer Engine with CUDA is not available here; there, "
                         "model.fp8=rowwise runs torchao's FP8)")
    if capability is None:
        raise ValueError(f"model.fp8={fp8}: needs a CUDA GPU")
    check_fp8_card(fp8, capability)


def check_fp8_card(fp8: str, capability: tuple[int, int] | None) -> None:
    """One-line ValueError when this CUDA card (``capability``; None: no CUDA, nothing to check) has no
    FP8 tensor cores."""
    if capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(f"model.fp8={fp8}: this GPU (compute capability {capability[0]}.{capability[1]}) has no FP8 "
                         f"tensor cores; FP8 needs {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later "
                         "(Ada, Hopper): set model.fp8=null")


def device_capability() -> tuple[int, int] | None:
    """The current CUDA card's compute capability, or None without CUDA."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def enable_fp8(model: torch.nn.Module, fp8: str | None, margin: int = 0, amax_history_len: int = 1024,
               amax_compute_algo: str = "max") -> None:
    """Write the FP8 recipe into ``model.config`` (megatron's fields); ``fp8=None`` (or a torchao recipe)
    leaves it off."""
    config = model.config
    config.fp8 = fp8 if fp8 in FP8_TE_RECIPES else None
    config.fp8_recipe = "delayed"
    config.fp8_margin = margin
    config.fp8_amax_history_len = amax_history_len
    config.fp8_amax_compute_algo = amax_compute_algo
