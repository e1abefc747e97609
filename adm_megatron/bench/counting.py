"""Counting the network evaluations (and their analytic FLOPs) of a distillation run.

``instrument(networks, counter, arch, ...)`` replaces the three diffusion transformers of a
:class:`~adm_megatron.algorithms.networks.Networks` (generator, fake score, teacher) with
:class:`CountingDiT` wrappers, so every call the algorithm makes is tallied under the counter's
current phase: a plain call as the network's role (the CFG teacher's batched cond / uncond call is
one call of 2x the batch), a ``features`` call (a discriminator backbone) as ``<role>.features``.
Each call's FLOPs follow :mod:`adm_megatron.bench.flops`, with the backward it will take read from
the call itself: grad mode, whether the network's base weights are trainable, whether its LoRA
adapters (``adm_megatron.lora``: a LoRA generator's, base frozen) are, whether the input carries a
gradient. A network with adapters also counts their own work (the family's ``lora_flops``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import torch

from adm_megatron.algorithms.networks import DiTFunction, Networks, TextCondition
from adm_megatron.bench.flops import AdaptedLinear
from adm_megatron.families import family_of_arch
from adm_megatron.lora.adapters import LoraAdapters
from adm_megatron.models.taps import feature_depth


@dataclass
class Tally:
    calls: int = 0
    samples: int = 0
    flops: float = 0.0


class EvalCounter:
    """Tallies per (phase, role); ``phase`` is set by whoever runs the phases."""

    def __init__(self):
        self.phase = "outside phases"
        self.tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)

    def add(self, role: str, samples: int, flops: float) -> None:
        tally = self.tallies[(self.phase, role)]
        tally.calls += 1
        tally.samples += samples
        tally.flops += flops

    def reset(self) -> None:
        self.tallies.clear()

    def phase_flops(self, phase: str) -> float:
        return sum(t.flops for (p, _), t in self.tallies.items() if p == phase)

    def per_phase(self) -> dict[str, dict[str, dict]]:
        """{phase: {role: {calls, samples, flops}}}."""
        out: dict[str, dict[str, dict]] = defaultdict(dict)
        for (phase, role), t in sorted(self.tallies.items()):
            out[phase][role] = {"calls": t.calls, "samples": t.samples, "flops": t.flops}
        return dict(out)


class CountingDiT:
    """A :class:`DiTFunction` that tallies each call before making it (same interface)."""

    def __init__(self, fn: DiTFunction, role: str, counter: EvalCounter, arch):
        self.fn = fn
        self.role = role
        self.counter = counter
        self.arch = arch
        self.family = family_of_arch(arch)
        self.call_flops = self.family.call_flops
        self.module = fn.module

    def _count(self, role: str, x: torch.Tensor, cond, blocks: int | None, output_layer: bool):
        grad = torch.is_grad_enabled()
        adapters = lora_of(self.module)
        own = set() if adapters is None else {id(p) for p in adapters.parameters()}
        trainable = grad and any(p.requires_grad for p in self.module.parameters() if id(p) not in own)
        text = cond.text if isinstance(cond, TextCondition) else cond
        call = self.call_flops(self.arch, tuple(x.shape), text.shape[1], blocks, output_layer)
        adapters_trainable = False
        if adapters is not None:
            if self.family.lora_flops is None:
                raise ValueError(f"model family {self.family.name!r}: no FLOP formula for LoRA adapters (lora_flops)")
            adapters_trainable = grad and any(p.requires_grad for p in adapters.parameters())
            call = replace(call, adapters=self.family.lora_flops(
                self.arch, tuple(x.shape), text.shape[1], adapted_linears(adapters), blocks))
        self.counter.add(role, x.shape[0], call.total(grad_to_input=grad and x.requires_grad, trainable=trainable,
                                                      adapters_trainable=adapters_trainable))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self._count(self.role, x_t, cond, None, True)
        return self.fn(x_t, t, cond)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond, every: int):
        self._count(f"{self.role}.features", x_t, cond, feature_depth(self.arch.num_layers, every), False)
        return self.fn.features(x_t, t, cond, every)


def lora_of(module: torch.nn.Module) -> LoraAdapters | None:
    """The LoRA adapters inside ``module`` (a model, or a wrapper of one such as DDP), or None."""
    return next((m for m in module.modules() if isinstance(m, LoraAdapters)), None)


def adapted_linears(adapters: LoraAdapters) -> list[AdaptedLinear]:
    """The adapted linears as the FLOP formulas read them (whole widths: any layout counts the same)."""
    return [AdaptedLinear(t.path, t.in_features, t.out_features, adapters.config.rank)
            for t in adapters.targets.values()]


def instrument(networks: Networks, counter: EvalCounter, arch) -> None:
    """Wrap ``networks``' generator, fake score and teacher in place (the algorithm holding the
    same ``Networks`` object then calls the wrappers); a role the method has not (ADP's fake
    score) stays None."""
    for role in ("generator", "fake_score", "teacher"):
        if getattr(networks, role) is not None:
            setattr(networks, role, CountingDiT(getattr(networks, role), role, counter, arch))
