"""Exponential moving average of the generator's trained parameters (this rank's shards; a LoRA
generator's adapters, not its frozen base); checkpointed sharded like the parameters themselves.

The average is held in fp32 whatever the parameters' dtype, as Megatron-LM / NeMo keep EMA and
main weights: with bf16 parameters (``model.bf16_params``) a bf16 average would not move at all,
since an update ``(1 - decay) (p - ema)`` with decay 0.999 is far below bf16's resolution (8
mantissa bits) -- the exported "EMA" would be the generator's first weights."""

from __future__ import annotations

import contextlib

import torch
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor


class ParameterEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().to(torch.float32, copy=True)
                       for n, p in module.named_parameters() if p.requires_grad}

    def _tracked(self, module: torch.nn.Module):
        return ((n, p) for n, p in module.named_parameters() if n in self.shadow)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in self._tracked(module):
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in self._tracked(module):
            param.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """The module runs with the EMA weights inside the block and gets its own back after it, bit
        for bit, the average untouched. fp32 weights are exchanged with the average in place (one
        tensor's copy at a time, not a second model); lower-precision weights, which cannot hold the
        fp32 average, wait in host memory meanwhile."""
        held = {}
        with torch.no_grad():
            for name, param in self._tracked(module):
                if param.dtype == torch.float32:
                    self._exchange(param, self.shadow[name])
                else:
                    held[name] = param.detach().to("cpu", copy=True)
                    param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._tracked(module):
                    if name in held:
                        param.copy_(held[name])
                    else:
                        self._exchange(param, self.shadow[name])

    @staticmethod
    def _exchange(param: torch.Tensor, shadow: torch.Tensor) -> None:
        kept = param.detach().clone()
        param.copy_(shadow)
        shadow.copy_(kept)

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
