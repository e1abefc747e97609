"""Optimizer state sharded over data parallel (ZeRO-1/2 style) on megatron-core DDP's own buffers.

With ``optim.<network>.shard_over_dp=true`` the network is wrapped by megatron-core's
``DistributedDataParallel`` with ``use_distributed_optimizer=True``. That DDP keeps the parameters
and gradients in bucketed flat buffers padded to a multiple of the data-parallel size; after the
backward ``finish_grad_sync`` *reduce-scatters* each bucket's gradients, so rank r of the
data-and-context-parallel group holds the averaged gradient of the r-th 1/DP slice of every bucket
(``torch.distributed.reduce_scatter_tensor``: NCCL has it, and so has gloo in torch 2.13, so the
same call runs on both backends). ``ShardedMainParams`` owns exactly that slice: its main params
(views of the fp32 parameters' slice, as megatron's distributed optimizer does, or fp32 copies of
bf16 ones) and AdamW's two moments exist only for the elements of the slice (1/DP of the network);
the step updates them (in the DDP parameter buffer itself, or copied into it from the fp32
copies) and ``start_param_sync`` all-gathers the buffer so every rank has the updated parameters
again.

Why this and not the alternatives:
- megatron-core 0.16.1's ``DistributedOptimizer`` is the natural choice, but it cannot be built
  without CUDA: ``_build_model_and_main_param_groups`` accepts only parameters whose
  ``param.type()`` is one of the strings ``'torch.cuda.FloatTensor'``, ``'torch.cuda.HalfTensor'``,
  ``'torch.cuda.BFloat16Tensor'`` (optimizer/distrib_optimizer.py:361 and :420, else ``TypeError``
  at :431), and its base ``MixedPrecisionOptimizer.__init__`` allocates ``torch.tensor(...,
  device='cuda')`` (optimizer/optimizer.py:481, :485). A device redirect cannot change a tensor's
  type string, so the tests could not run it on gloo. What *does* run on CPU is everything around
  it: DDP's buffers, buckets, reduce-scatter and all-gather, and the range arithmetic that says
  which slice of each parameter a rank owns (``DistributedOptimizer._build_gbuf_range_map``, a
  classmethod that only reads the buffer's layout). This module uses those and replaces only the
  optimizer object, so the shard layout, the collectives and the padding are megatron's.
- torch's ``ZeroRedundancyOptimizer`` shards whole parameters (uneven across ranks) and does its own
  broadcasts, outside megatron DDP's ``main_grad`` buffers; FSDP2's ``fully_shard`` replaces the
  parameters by DTensors, which megatron's TP / CP layers, their ``sharded_state_dict`` and
  ``finalize_model_grads`` do not expect. Both would mean a second gradient path beside megatron's.

Checkpoints stay in the unsharded (model-space) format: the moments are gathered over the DP group
into tensors shaped like the parameters before saving, and each rank slices its part after loading,
as megatron's own ``fully_reshardable`` distributed-optimizer format does. A sharded run therefore
resumes at any DP size, and sharded and unsharded runs load each other's checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from adm_megatron.train.main_params import MainParams, Slot, main_dtype


def sharded_ranges(ddp_module) -> list[tuple[torch.nn.Parameter, slice]]:
    """(parameter, flat slice of it this rank owns) for each parameter with a piece in this rank's
    shard of the DDP buffers, from megatron's own range map."""
    owned = []
    for buffer in ddp_module.buffers:
        (bucket_ranges,) = DistributedOptimizer._build_gbuf_range_map(buffer).values()
        for bucket in bucket_ranges:
            for param, ranges in bucket["param_map"].items():
                piece = ranges["param"]
                owned.append((param, slice(piece.start, piece.end)))
    return owned


class ShardedMainParams(MainParams):
    """Main params for this rank's 1/DP slice of a network wrapped with
    ``use_distributed_optimizer=True`` (see the module docstring)."""

    sharded = True

    def __init__(self, ddp_module, params: list[torch.nn.Parameter]):
        if not ddp_module.ddp_config.use_distributed_optimizer:
            raise ValueError("ShardedMainParams needs DDP built with use_distributed_optimizer=True")
        self.module = ddp_module
        self.group = ddp_module.intra_dp_cp_group
        index = {id(p): i for i, p in enumerate(params)}
        self.params = params
        self.slots = []
        for param, piece in sharded_ranges(ddp_module):
            flat = param.detach().view(-1)[piece]  # a view into DDP's parameter buffer
            main = flat if main_dtype(param) == param.dtype else flat.to(main_dtype(param))  # (as megatron's)
            self.slots.append(Slot(index[id(param)], param, main, piece))

    def grad(self, slot: Slot) -> torch.Tensor:
        return slot.param.main_grad.view(-1)[slot.piece]

    def norm_group(self):
        # every rank holds distinct slices: the norm sums over DP-CP and TP, i.e. the world (PP = 1)
        return None

    @torch.no_grad()
    def write_back(self) -> None:
        for slot in self.slots:
            if slot.is_copy:
                slot.param.detach().view(-1)[slot.piece].copy_(slot.main)
        self.module.start_param_sync(force_sync=True)  # all-gather the updated buffer slices

    @torch.no_grad()
    def refresh_from_params(self) -> None:
        for slot in self.slots:
            if slot.is_copy:
                slot.main.copy_(slot.param.detach().view(-1)[slot.piece])

    def to_model_space(self, per_slot: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Full (this TP / CP rank's) parameter-shaped tensors from each rank's slices: every rank
        contributes its slices to zeros and an all-reduce over the DP group sums them (exact:
        each element has exactly one non-zero contribution)."""
        pieces = {slot.index: (slot.piece, per_slot[i]) for i, slot in enumerate(self.slots)}
        full = []
        for index, param in enumerate(self.params):  # one parameter's worth on the device at a time
            tensor = torch.zeros(param.numel(), dtype=main_dtype(param), device=param.device)
            if index in pieces:
                piece, values = pieces[index]
                tensor[piece] = values
            dist.all_reduce(tensor, group=self.group)
            full.append(tensor.cpu().view(param.shape))  # (.cpu() is a no-op on CPU)
        return full

    def from_model_space(self, full: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: full[slot.index].reshape(-1)[slot.piece].clone() for i, slot in enumerate(self.slots)}
