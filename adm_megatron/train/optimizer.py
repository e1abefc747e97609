"""One optimiser per trainable network, behind one small interface.

The gradients arrive in megatron-core DDP's ``param.main_grad`` buffers (already averaged over the
data-and-context-parallel group by ``finalize_model_grads``). ``NetworkOptimizer.step`` computes the
global gradient norm with megatron-core's ``get_grad_norm_fp32`` over the non-duplicated shards
(summed over the model-parallel group), clips, and steps a ``torch.optim.AdamW`` that reads the
main grads. megatron-core's own optimizers (FP32Optimizer, DistributedOptimizer) hard-code CUDA
tensors, so they cannot run on CPU; AdamW on the main grads runs on both and is what the tests
check. Parameters stay fp32 (BF16 is autocast), so the main grads are the optimizer's grads as is.

The learning rate follows megatron-core's ``OptimizerParamScheduler`` (linear warmup, then constant,
linear, cosine or inverse-square-root decay to ``min_lr``), advanced once per taken step over the
network's ``total_updates`` in the run.

For checkpoints, ``sharded_state_dict`` gives Adam's moments as megatron-core ``ShardedTensor``s
sharded like the parameters they belong to (so a checkpoint reloads at another TP / CP / DP
layout), with the shared step count and the scheduler's state as common objects.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch.optim.optimizer import _get_scalar_dtype

from adm_megatron.config import OptimizerConfig
from adm_megatron.parallel.device_scope import cpu_device_scope


class NetworkOptimizer:
    def __init__(self, module: torch.nn.Module, config: OptimizerConfig, total_updates: int):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.config = config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if config.warmup_iters else config.lr,
            max_lr=config.lr,
            min_lr=config.min_lr,
            lr_warmup_steps=config.warmup_iters,
            lr_decay_steps=total_updates,
            lr_decay_style=config.decay_style,
            start_wd=config.weight_decay,
            end_wd=config.weight_decay,
            wd_incr_steps=total_updates,
            wd_incr_style="constant",
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float:
        grads = [
            p.main_grad for p in self.params if param_is_not_tensor_parallel_duplicate(p)
        ]
        with cpu_device_scope():
            return float(
                get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
            )

    def step(self, skip_if_not_finite: bool) -> tuple[float, bool]:
        """Clip and step; returns (grad norm before clipping, whether the step was taken).

        A non-finite gradient norm raises unless ``skip_if_not_finite`` (then nothing changes).
        """
        norm = self.grad_norm()
        if not math.isfinite(norm):
            if not skip_if_not_finite:
                raise FloatingPointError(f"gradient norm is {norm}")
            return norm, False
        scale = 1.0
        if self.config.grad_clip > 0 and norm > self.config.grad_clip:
            scale = self.config.grad_clip / (norm + 1e-6)
        for p in self.params:
            p.grad = p.main_grad if scale == 1.0 else p.main_grad * scale
        self.optimizer.step()
        self.scheduler.step(increment=1)
        for p in self.params:
            p.grad = None
        return norm, True

    # -- checkpoints ---------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Adam's state for every parameter as its first step would create it (step 0, zero
        moments), so that a checkpoint has a tensor to save or load for each; stepping from it
        is the same as stepping from no state."""
        for p in self.params:
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """The optimizer and scheduler state, sharded like ``model_sharded`` (the network's
        ``ShardedTensor``s, keyed uniquely for the network); for saving and for loading."""
        self._init_state()
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values()}
        if len(steps) != 1:
            raise RuntimeError(f"optimizer step counts differ between parameters: {sorted(steps)}")
        step = next(iter(state["state"].values()))["step"].clone()
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_sharded, self.params), exclude_keys=("step",)
        )
        return {"optimizer": state, "step": step, "scheduler": self.scheduler.state_dict()}

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Restore what ``sharded_state_dict`` saved (as ``dist_checkpointing.load`` returns it)."""
        state = loaded["optimizer"]
        for param_state in state["state"].values():
            param_state["step"] = loaded["step"].clone()
        self.optimizer.load_state_dict(state)
        self.scheduler.load_state_dict(loaded["scheduler"])
