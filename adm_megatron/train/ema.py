"""Exponential moving average of the generator's trained parameters (this rank's shards; a LoRA
generator's adapters, not its frozen base); checkpointed sharded like the parameters themselves."""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor


class ParameterEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def _tracked(self, module: torch.nn.Module):
        return ((n, p) for n, p in module.named_parameters() if n in self.shadow)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in self._tracked(module):
            self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in self._tracked(module):
            param.copy_(self.shadow[name])

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the module's tracked weights with the EMA's; swapping again restores both, bit for
        bit (one tensor's copy at a time, not a second model)."""
        for name, param in self._tracked(module):
            held = param.detach().clone()
            param.copy_(self.shadow[name])
            self.shadow[name].copy_(held)

    def sharded_state_dict(self, model_sharded: dict, prefix: str) -> dict:
        """The shadow weights as ``ShardedTensor``s laid out like ``model_sharded`` (the module's
        sharded state dict, its keys ``prefix`` + parameter name)."""
        return {
            name: make_sharded_optimizer_tensor(model_sharded[prefix + name], shadow, prefix="ema")
            for name, shadow in self.shadow.items()
        }

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict) -> None:
        for name, shadow in self.shadow.items():
            shadow.copy_(loaded[name])
