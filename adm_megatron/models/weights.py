"""Moving whole (unsharded) weights in and out of a tensor-parallel megatron module.

A megatron parallel linear marks its sharded parameters with ``tensor_model_parallel`` and
``partition_dim``; each rank keeps the contiguous ``1 / tp`` slice of that dimension. These helpers
slice a full tensor for this rank on load and gather the shards back for export, with one-line
errors naming the tensor and both shapes on any mismatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from adm_megatron.config import ConfigError


def _is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and (
        parallel_state.get_tensor_model_parallel_world_size() > 1
    )


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    shape = list(param.shape)
    if _is_sharded(param):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def load_full_state_dict(module: torch.nn.Module, full: dict[str, torch.Tensor], source: str) -> None:
    """Copy whole tensors into ``module``'s (possibly TP-sharded) parameters and buffers."""
    own = dict(module.named_parameters())
    own.update((n, b) for n, b in module.named_buffers() if n in module.state_dict())
    missing = sorted(set(own) - set(full))
    if missing:  # a config.json edited, or weights of another size: one line (a traceback was a KeyError)
        raise ConfigError(f"{source}: its weights do not match its config: {len(missing)} tensor(s) the model it "
                          f"describes needs are not in the weight files (the first, by megatron name: {missing[0]!r})")
    unexpected = sorted(set(full) - set(own))
    if unexpected:
        raise ConfigError(f"{source}: its weights do not match its config: {len(unexpected)} tensor(s) in the weight "
                          f"files have no place in the model it describes (the first, by megatron name: "
                          f"{unexpected[0]!r})")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, target in own.items():
            tensor = full[name]
            if tuple(tensor.shape) != full_shape(target):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{full_shape(target)}"
                )
            if _is_sharded(target):
                tensor = tensor.chunk(tp_size, dim=target.partition_dim)[tp_rank]
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def gather_tensor_parallel(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor from this rank's shard of ``tensor`` (laid out like ``param``, e.g. its
    weight or its gradient): an all-gather over the TP group along ``param``'s partition dim."""
    if not _is_sharded(param):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=param.partition_dim)


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors of ``module`` on every TP rank (all-gather of the sharded ones), on CPU."""
    return {
        name: gather_tensor_parallel(tensor.detach(), tensor).cpu().clone()
        for name, tensor in module.state_dict(keep_vars=True).items()
        if not name.endswith("_extra_state")
    }
