"""LoRA adapters on a megatron model's tensor-parallel linears: ``y = W x + (alpha / r) B A x``.

Sharding follows the base layer, so the adapter adds no communication of hidden-size tensors.
"SP" below is the base layer's own sequence parallelism (its ``sequence_parallel``), which is not
always the model's: SD3's text-stream linears run without it in a sequence-parallel model, their
tokens whole on every rank, and so do their adapters.

- column-parallel layer (output split over TP): A [r, in] is whole on every rank, B [out/tp, r]
  is split like the weight's rows. Without SP, ``A x`` goes through megatron's
  ``copy_to_tensor_model_parallel_region`` (its backward all-reduces the partial input gradient,
  as the base layer does for its own input); with SP, ``A x`` is computed on the rank's sequence
  slice and all-gathered (r channels instead of the base layer's hidden size), its backward
  reduce-scattering. A's gradient then covers the rank's rows only, so A is tagged
  ``sequence_parallel`` and megatron's ``finalize_model_grads`` sums it over TP.
- row-parallel layer (input split over TP): A [r, in/tp] is split like the weight's columns, B
  [out, r] whole. ``A x`` is a partial sum over the TP ranks, reduced exactly as the base output
  is: all-reduced without SP, reduce-scattered over the sequence with SP (then B is applied to
  the rank's rows; B's gradient covers those rows only, so B is tagged ``sequence_parallel``).

A starts as PEFT's default (Kaiming-uniform, drawn whole from a generator seeded by the run seed
and the layer's name, then sliced: the same adapter at any layout) and B at zero, so a fresh LoRA
model equals its base exactly. The base model's parameters are frozen.

The adapters are one child module of the model, ``lora`` (keys ``lora.<layer path with '-'>.
lora_A`` / ``lora_B``), applied by forward hooks on the base linears: the base layers, their
parameter names, their sharded state dict and the diffusers key mapping stay as they are, while
the model's ``state_dict`` / ``sharded_state_dict`` (and so its megatron checkpoints and the
optimizer's sharded state) carry the adapters, sharded like their layers.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from adm_megatron.config import LoraConfig
from adm_megatron.lora.targets import KeyMapping, LoraTarget, default_key_mapping, resolve_targets

LORA_MODULE = "lora"


def adapter_key(path: str) -> str:
    """A module name without dots for the layer at ``path`` (``blocks-0-mlp-linear_fc1``)."""
    return path.replace(".", "-")


class LoraAdapter(torch.nn.Module):
    """This rank's shards of one layer's A and B, and the adapter's output for the layer's input."""

    def __init__(self, target: LoraTarget, rank: int, alpha: float, seed: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.kind = target.kind
        self.scale = alpha / rank
        self.sequence_parallel = target.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        a_full = torch.empty(rank, target.in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        if self.kind == "column":
            a, b_shape, split, whole = a_full, (target.out_features // tp, rank), "lora_B", "lora_A"
        else:
            a = a_full.chunk(tp, dim=1)[tp_rank]
            b_shape, split, whole = (target.out_features, rank), "lora_A", "lora_B"
        self.lora_A = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        self.split_dim = 0 if split == "lora_B" else 1
        set_tensor_model_parallel_attributes(getattr(self, split), True, self.split_dim, 1)
        set_defaults_if_not_set_tensor_model_parallel_attributes(getattr(self, whole))
        if self.sequence_parallel:  # the parameter whose gradient covers only this rank's rows (see above)
            setattr(getattr(self, "lora_A" if self.kind == "column" else "lora_B"), "sequence_parallel", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's share of the layer output for the layer's input ``x`` (as the base layer
        gets it: the sequence slice under SP, the TP input shard for a row-parallel layer)."""
        h = F.linear(x, self.lora_A)
        if self.kind == "column":
            if self.sequence_parallel:
                h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
            else:
                h = copy_to_tensor_model_parallel_region(h)
        elif self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h)
        else:
            h = reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self, a_full: torch.Tensor, b_full: torch.Tensor) -> torch.Tensor:
        """scale · B A from whole A and B (what merging adds to the whole weight), in float64 so that
        the merged weight is rounded to its dtype once."""
        return b_full.double() @ a_full.double() * self.scale


class LoraAdapters(torch.nn.ModuleDict):
    """All adapters of a model, keyed by ``adapter_key(layer path)``; ``targets`` by the same keys."""

    def __init__(self, config: LoraConfig, targets: list[LoraTarget], adapters: dict[str, LoraAdapter]):
        super().__init__(adapters)
        self.config = config
        self.targets = {adapter_key(t.path): t for t in targets}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Each A and B as a ``ShardedTensor`` split over TP like its layer (whole ones replicated)."""
        dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True)
        sharded = {}
        for key, adapter in self.items():
            split = "lora_B" if adapter.kind == "column" else "lora_A"
            sharded.update(make_sharded_tensors_for_checkpoint(
                adapter.state_dict(prefix="", keep_vars=True), f"{prefix}{key}.", {split: adapter.split_dim},
                sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=dp_cp_group,
            ))
        return sharded

    def numel(self) -> int:
        """Parameters of the adapters on this rank."""
        return sum(p.numel() for p in self.parameters())

    def full_numel(self) -> int:
        """Parameters of the adapters whole (every TP rank's shards together): r (in + out) each."""
        return sum(self.config.rank * (t.in_features + t.out_features) for t in self.targets.values())


def _add_output(adapter: LoraAdapter):
    def hook(module, args, output):
        out, bias = output
        return out + adapter(args[0]), bias

    return hook


def lora_adapters(model: torch.nn.Module) -> LoraAdapters | None:
    """The model's adapters, or None for a model without LoRA."""
    adapters = getattr(model, LORA_MODULE, None)
    return adapters if isinstance(adapters, LoraAdapters) else None


def apply_lora(model: torch.nn.Module, config: LoraConfig, seed: int, to_hf: KeyMapping | None = None) -> LoraAdapters:
    """Freeze ``model`` and add adapters to the linears ``config.target_modules`` names (diffusers
    names, resolved through ``to_hf``, the model's megatron -> diffusers key mapping; its family's
    default when None). Returns the adapters (also ``model.lora``)."""
    if hasattr(model, LORA_MODULE):
        raise RuntimeError(f"the model already has a {LORA_MODULE!r} module (LoRA applied twice?)")
    targets = resolve_targets(model, config.target_modules, to_hf or default_key_mapping(model))
    weight = next(model.parameters())
    model.requires_grad_(False)
    adapters = {
        adapter_key(t.path): LoraAdapter(t, config.rank, config.alpha, zlib.crc32(f"{seed}:{t.path}".encode()),
                                         weight.dtype, weight.device)
        for t in targets
    }
    container = LoraAdapters(config, targets, adapters)
    model.add_module(LORA_MODULE, container)
    modules = dict(model.named_modules())
    for key, target in container.targets.items():
        modules[target.path].register_forward_hook(_add_output(container[key]))
    return container
