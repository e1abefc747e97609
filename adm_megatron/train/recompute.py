"""Activation recompute chosen per network and per phase (``model.recompute``).

Each backbone (teacher, fake score, generator) gets, at the start of every phase, the mode the
config gives it for that phase, written into its megatron ``TransformerConfig``:
- ``full``: ``recompute_granularity='full'``, ``recompute_method='uniform'``,
  ``recompute_num_layers=1`` -- every block keeps only its input and is run again in backward
  (the model's block loop reads this at run time, through ``tensor_parallel.checkpoint``);
- ``selective``: ``recompute_granularity='selective'`` -- the core attention (softmax(QK^T)V) of
  every block is run again in backward instead of keeping its internals, megatron's meaning of
  selective recompute (``recompute_modules=['core_attn']``). The families' attentions are our own
  modules, not megatron's ``Attention`` (which reads the granularity once, at construction), so this
  module wraps the ``forward`` of every attention's ``core_attention`` submodule (megatron's name
  for it, which every family's attention keeps) in ``tensor_parallel.checkpoint`` when the network's
  config says ``selective``; a network with none is refused ``selective`` in one line;
- ``none``: nothing is recomputed.

Recompute changes memory and time, never values: the tests check that an iteration is the same with
and without it, and that each network recomputes exactly in the phases its setting names.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from adm_megatron.config import ConfigError, RecomputeConfig, parse_recompute

_GRANULARITY = {"none": None, "selective": "selective", "full": "full"}


def set_recompute(model: torch.nn.Module, mode: str) -> None:
    """Write ``mode`` into ``model``'s TransformerConfig, as megatron's fields say it."""
    config = model.config
    config.recompute_granularity = _GRANULARITY[mode]
    config.recompute_method = "uniform" if mode == "full" else None
    config.recompute_num_layers = 1 if mode == "full" else None


def _checkpointed_core(core: torch.nn.Module, config) -> None:
    """Make ``core``'s forward recompute in backward while ``config`` says selective."""
    plain = core.forward

    def forward(query, key, value):
        if config.recompute_granularity == "selective" and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(plain, False, query, key, value)
        return plain(query, key, value)

    core.forward = forward  # an instance attribute: the module's state dict and class stay as they are


class RecomputeSwitch:
    """Sets each backbone's recompute mode at the start of each phase (``before_phase``)."""

    def __init__(self, models: dict[str, torch.nn.Module], config: RecomputeConfig):
        self.models = models
        self.modes = {name: parse_recompute(getattr(config, name), f"model.recompute.{name}", "config")
                      for name in models}
        for name, model in models.items():
            cores = [m.core_attention for m in model.modules()
                     if isinstance(getattr(m, "core_attention", None), torch.nn.Module)]
            if not cores and "selective" in self.modes[name].values():
                raise ConfigError(f"model.recompute.{name}={getattr(config, name)!r}: the {name}'s model "
                                  f"({type(model).__name__}) has no core attention (an attention's "
                                  "`core_attention` submodule) to recompute; use full or none")
            for core in cores:
                _checkpointed_core(core, model.config)

    def before_phase(self, phase: str, trained: tuple[str, ...] = ()) -> None:
        for name, model in self.models.items():
            set_recompute(model, self.modes[name][phase])
