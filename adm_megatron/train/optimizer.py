"""One optimiser per trainable network, behind one small interface.

The gradients arrive in megatron-core DDP's ``param.main_grad`` buffers (already averaged over the
data-and-context-parallel group by ``finalize_model_grads``, or reduce-scattered to this rank's
slice when the network's optimizer state is sharded). ``NetworkOptimizer.step`` computes the
global gradient norm with megatron-core's ``get_grad_norm_fp32`` over the non-duplicated pieces,
clips, and steps a ``torch.optim.AdamW`` over the network's *main params*
(``adm_megatron.train.main_params``): the parameters themselves, fp32 master copies of bf16
parameters, or, with ``optim.<network>.shard_over_dp``, only this data-parallel rank's 1/DP slice
(``adm_megatron.train.sharded_optimizer``, which also says why megatron-core's own
``DistributedOptimizer`` is not used: it cannot be built without CUDA).

The learning rate follows megatron-core's ``OptimizerParamScheduler`` (linear warmup, then constant,
linear, cosine or inverse-square-root decay to ``min_lr``), advanced once per taken step over the
network's ``total_updates`` in the run.

For checkpoints, ``sharded_state_dict`` gives Adam's moments (and fp32 master params, when the
model's are bf16) in model space -- shaped like the parameters, gathered over DP when sharded -- as
megatron-core ``ShardedTensor``s sharded like the parameters they belong to (so a checkpoint reloads
at another TP / CP / DP layout, sharded or not), with the shared step count and the scheduler's
state as common objects.

Where the state lives between phases is ``adm_megatron.train.offload``'s business: ``state_tensors``
lists every tensor this optimizer owns besides the model.
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
from adm_megatron.parallel import any_rank
from adm_megatron.parallel.device_scope import cpu_device_scope
from adm_megatron.train.main_params import FullMainParams, MainParams


class NetworkOptimizer:
    def __init__(self, module: torch.nn.Module, config: OptimizerConfig, total_updates: int):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.config = config
        if config.shard_over_dp:
            from adm_megatron.train.sharded_optimizer import ShardedMainParams

            self.main: MainParams = ShardedMainParams(module, self.params)
        else:
            self.main = FullMainParams(self.params)
        self.optimizer = torch.optim.AdamW(
            [slot.main for slot in self.main.slots], lr=config.lr, betas=config.betas,
            weight_decay=config.weight_decay,
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
            self.main.grad(slot) for slot in self.main.slots
            if param_is_not_tensor_parallel_duplicate(slot.param)
        ]
        with cpu_device_scope():
            return float(get_grad_norm_fp32(grads, grad_stats_parallel_group=self.main.norm_group()))

    def duplicates_finite(self) -> bool:
        """Whether the gradients of tensor-parallel duplicates (norms, embeddings: every TP rank holds
        the parameter whole) are finite on every rank of the norm group (collective over it). The
        norm counts only TP rank 0's copy, as megatron's does; a NaN in another rank's copy alone (a
        fault: the copies compute the same) would otherwise be stepped into that rank's weights with
        a finite norm reported, and the TP ranks' copies would part for good."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return True  # no duplicates: the norm saw every gradient
        grads = [self.main.grad(slot) for slot in self.main.slots
                 if not param_is_not_tensor_parallel_duplicate(slot.param)]
        # a sum is non-finite when any element is (no tensor of the gradient's size, as isfinite makes)
        local = bool(torch.stack([g.sum() for g in grads]).isfinite().all()) if grads else True
        return not any_rank(not local, self.main.norm_group())

    def checked_norm(self) -> float:
        """The global gradient norm before clipping, NaN when a TP duplicate's gradient is not finite
        on some rank (collective over the norm group)."""
        norm = self.grad_norm()
        return norm if not math.isfinite(norm) or self.duplicates_finite() else float("nan")

    def step(self, skip_if_not_finite: bool, norm: float | None = None) -> tuple[float, bool]:
        """Clip and step; returns (grad norm before clipping, whether the step was taken). ``norm``:
        this update's ``checked_norm()`` when the caller has it already.

        A non-finite gradient norm, or a non-finite gradient of a TP duplicate on any rank (reported as
        a NaN norm), raises unless ``skip_if_not_finite`` (then nothing changes).
        """
        norm = self.checked_norm() if norm is None else norm
        if not math.isfinite(norm):
            if not skip_if_not_finite:
                raise FloatingPointError(f"gradient norm is {norm}")
            return norm, False
        scale = 1.0
        if self.config.grad_clip > 0 and norm > self.config.grad_clip:
            scale = self.config.grad_clip / (norm + 1e-6)
        for slot in self.main.slots:
            grad = self.main.grad(slot)
            grad = grad if scale == 1.0 else grad * scale
            slot.main.grad = grad if grad.dtype == slot.main.dtype else grad.to(slot.main.dtype)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        for slot in self.main.slots:
            slot.main.grad = None
        self.main.write_back()
        return norm, True

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer holds besides the model (Adam's moments, and the main params
        when they are fp32 copies rather than the model's own storage): what offload moves."""
        self._init_state()
        tensors = [t for state in self.optimizer.state.values() for k, t in state.items() if k != "step"]
        return tensors + [slot.main for slot in self.main.slots if slot.is_copy]

    def state_numel(self) -> int:
        """Elements of Adam state this rank holds (two moments per main-param element)."""
        return 2 * self.main.numel()

    # -- checkpoints ---------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Adam's state for every main param as its first step would create it (step 0, zero
        moments), so that a checkpoint has a tensor to save or load for each; stepping from it
        is the same as stepping from no state."""
        for slot in self.main.slots:
            state = self.optimizer.state[slot.main]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(slot.main, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(slot.main, memory_format=torch.preserve_format)

    def _model_space_state(self) -> dict:
        """Adam's state (and fp32 master params) as an optimizer ``state_dict`` over the model's
        parameters: one entry per trainable parameter, shaped like it (collective when sharded)."""
        self._init_state()
        own = self.optimizer.state_dict()
        keys = ["exp_avg", "exp_avg_sq"] + (["main_param"] if self.main.has_master_copy else [])
        per_key = {}
        for key in keys:
            per_slot = {i: (slot.main.detach() if key == "main_param" else own["state"][i][key])
                        for i, slot in enumerate(self.main.slots)}
            per_key[key] = self.main.to_model_space(per_slot)
        step = self._step_count(own)
        state = {i: {"step": step.clone(), **{k: per_key[k][i] for k in keys}} for i in range(len(self.params))}
        group = {k: v for k, v in own["param_groups"][0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    @staticmethod
    def _step_count(state: dict) -> torch.Tensor:
        steps = {float(s["step"]) for s in state["state"].values()}
        if len(steps) > 1:
            raise RuntimeError(f"optimizer step counts differ between parameters: {sorted(steps)}")
        if not steps:  # a rank that owns no slice of the network (sharded, tiny network)
            return torch.tensor(0.0, dtype=_get_scalar_dtype())
        return next(iter(state["state"].values()))["step"].clone()

    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """The optimizer and scheduler state, sharded like ``model_sharded`` (the network's
        ``ShardedTensor``s, keyed uniquely for the network); for saving and for loading."""
        state = self._model_space_state()
        step = state["state"][0]["step"].clone() if state["state"] else torch.tensor(0.0)
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_sharded, self.params), exclude_keys=("step",)
        )
        return {"optimizer": state, "step": step, "scheduler": self.scheduler.state_dict()}

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Restore what ``sharded_state_dict`` saved (as ``dist_checkpointing.load`` returns it),
        after the model's weights were loaded."""
        state = loaded["optimizer"]
        n = len(self.params)
        self.main.refresh_from_params()
        if self.main.has_master_copy:
            masters = self.main.from_model_space([state["state"][i]["main_param"] for i in range(n)])
            with torch.no_grad():
                for i, slot in enumerate(self.main.slots):
                    slot.main.copy_(masters[i].view_as(slot.main))
        moments = {k: self.main.from_model_space([state["state"][i][k] for i in range(n)])
                   for k in ("exp_avg", "exp_avg_sq")}
        own = {
            "state": {i: {"step": loaded["step"].clone(),
                          **{k: moments[k][i].view_as(slot.main) for k in moments}}
                      for i, slot in enumerate(self.main.slots)},
            "param_groups": [{**state["param_groups"][0], "params": list(range(len(self.main.slots)))}],
        }
        self.optimizer.load_state_dict(own)
        self.scheduler.load_state_dict(loaded["scheduler"])
