"""The parameters an optimizer steps ("main params") and how they map onto the model's.

``NetworkOptimizer`` steps a list of ``Slot``s: each names a model parameter, the tensor AdamW
updates for it (``main``) and the flat piece of the parameter it covers. Two layouts:

- ``FullMainParams`` (this module): every rank steps whole parameters. The main param is the
  parameter itself when it is fp32 / fp64; a bf16 / fp16 parameter gets an fp32 master copy (megatron's
  Float16 optimizer approach: the update is computed in fp32 and rounded into the parameter).
- ``ShardedMainParams`` (``sharded_optimizer.py``): each data-parallel rank steps only its 1/DP
  slice (a view of the parameter when it is fp32 / fp64, an fp32 copy of the slice when bf16).

Both give Adam's state in *model space* (tensors shaped like the parameters) for checkpoints, so
the two layouts load each other's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def main_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 for low-precision parameters; fp32 / fp64 parameters are their own precision."""
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass
class Slot:
    index: int  # position of the model parameter in the network's trainable parameter list
    param: torch.nn.Parameter
    main: torch.Tensor  # what AdamW steps
    piece: slice | None  # the flat piece of ``param`` covered; None: all of it (same shape)

    @property
    def is_copy(self) -> bool:
        """Whether ``main`` is a higher-precision copy (else the parameter or a view of it)."""
        return self.main.dtype != self.param.dtype


class MainParams:
    """Interface; see the module docstring."""

    sharded = False
    params: list[torch.nn.Parameter]
    slots: list[Slot]

    def grad(self, slot: Slot) -> torch.Tensor:
        """The (DP-averaged) gradient of ``slot``'s piece, shaped like ``slot.main``."""
        raise NotImplementedError

    def norm_group(self):
        """The process group the squared gradient norms are summed over (None: the world)."""
        raise NotImplementedError

    def write_back(self) -> None:
        """After a step: the model parameters take the main params' values on every rank."""
        raise NotImplementedError

    def refresh_from_params(self) -> None:
        """Before training / after loading weights: main params take the model's values."""
        raise NotImplementedError

    def to_model_space(self, per_slot: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """One state tensor per slot -> one parameter-shaped tensor per model parameter (collective
        when sharded)."""
        raise NotImplementedError

    def from_model_space(self, full: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The inverse: parameter-shaped tensors -> this rank's state tensor per slot."""
        raise NotImplementedError

    @property
    def has_master_copy(self) -> bool:
        """Whether the main params hold more precision than the model (then they are checkpointed)."""
        return any(main_dtype(p) != p.dtype for p in self.params)

    def numel(self) -> int:
        """Elements this rank's optimizer steps (its main params; each Adam moment has as many)."""
        return sum(slot.main.numel() for slot in self.slots)


class FullMainParams(MainParams):
    def __init__(self, params: list[torch.nn.Parameter]):
        from megatron.core import parallel_state

        self.params = params
        self._group = parallel_state.get_model_parallel_group()
        self.slots = [
            Slot(i, p, p if main_dtype(p) == p.dtype else p.detach().to(main_dtype(p)), None)
            for i, p in enumerate(params)
        ]

    def grad(self, slot: Slot) -> torch.Tensor:
        return slot.param.main_grad

    def norm_group(self):
        return self._group  # DP ranks hold the same (averaged) gradients: sum over TP only

    @torch.no_grad()
    def write_back(self) -> None:
        for slot in self.slots:
            if slot.is_copy:
                slot.param.copy_(slot.main)

    @torch.no_grad()
    def refresh_from_params(self) -> None:
        for slot in self.slots:
            if slot.is_copy:
                slot.main.copy_(slot.param)

    def to_model_space(self, per_slot: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [per_slot[i] for i in range(len(self.slots))]

    def from_model_space(self, full: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: full[i].clone() for i in range(len(self.slots))}
