"""Which tensor-parallel linears of a megatron model a LoRA config's ``target_modules`` name.

Target names are diffusers module names (``to_q``, ``to_out.0``, ``ff.net.2``...), matched as PEFT
matches them: a module is targeted when its full name equals a target or ends with ``.`` + target.
Our linears are found in diffusers terms through the model's own diffusers key mapping (the one
the converter uses, megatron state dict -> diffusers state dict), applied to each linear's weight
name, so nothing here names a model family's modules: a fused layer (CogVideoX's ``linear_qkv``)
maps to several diffusers modules (``attn1.to_q`` / ``to_k`` / ``to_v``), a plain one to one.

A fused layer gets one adapter (A over its input, B over its fused output), which is exactly one
adapter per part with a shared A; so the parts are targeted all together or not at all, and a
config naming only some of them is refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from adm_megatron.config import ConfigError
from adm_megatron.models.weights import full_shape

KeyMapping = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LoraTarget:
    path: str  # the linear's module name in the megatron model, e.g. blocks.0.self_attention.linear_qkv
    kind: str  # "column" (output split over TP) or "row" (input split over TP)
    in_features: int  # whole (unsharded) sizes
    out_features: int
    hf_modules: tuple[str, ...]  # the diffusers modules it stands for (several when fused)
    # the linear's own flag (megatron's and TE's linears keep it), not the model's: a model with
    # sequence parallelism can have linears without it (SD3's text stream, whole on every rank)
    sequence_parallel: bool


def parallel_kind(module: torch.nn.Module) -> str | None:
    """"column" / "row" for megatron-core's and Transformer Engine's parallel linears, else None."""
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    mode = getattr(module, "parallel_mode", None)  # megatron's TE linears say it themselves
    return mode if mode in ("column", "row") and hasattr(module, "weight") else None


def diffusers_modules(path: str, out_features: int, to_hf: KeyMapping) -> tuple[str, ...]:
    """The diffusers module names the mapping gives the linear ``path``'s weight (meta tensor)."""
    probe = {f"{path}.weight": torch.empty(out_features, 1, device="meta")}
    return tuple(name[: -len(".weight")] for name in to_hf(probe))


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _generic_name(module_name: str) -> str:
    """``transformer_blocks.3.attn1.to_q`` -> ``attn1.to_q`` (for listing what can be targeted)."""
    return re.sub(r"^[A-Za-z_]+\.\d+\.", "", module_name)


def resolve_targets(model: torch.nn.Module, target_modules: list[str], to_hf: KeyMapping,
                    source: str = "model.lora.target_modules") -> list[LoraTarget]:
    """The parallel linears of ``model`` the targets name; one-line ConfigError for a target that
    names none of them, or for part of a fused layer."""
    linears = []
    for path, module in model.named_modules():
        kind = parallel_kind(module)
        if kind is None:
            continue
        out_features, in_features = full_shape(module.weight)
        linears.append(LoraTarget(path, kind, in_features, out_features,
                                  diffusers_modules(path, out_features, to_hf),
                                  bool(module.sequence_parallel)))
    used: set[str] = set()
    chosen = []
    for linear in linears:
        hit = {t for t in target_modules for m in linear.hf_modules if _matches(m, t)}
        parts = [m for m in linear.hf_modules if any(_matches(m, t) for t in target_modules)]
        if parts and len(parts) != len(linear.hf_modules):
            generic = [_generic_name(m) for m in linear.hf_modules]
            raise ConfigError(
                f"{source}: {', '.join(sorted(hit))} targets only part of the fused layer "
                f"{linear.path} ({', '.join(generic)}): name all of {', '.join(generic)} or none"
            )
        if parts:
            used |= hit
            chosen.append(linear)
    unused = [t for t in target_modules if t not in used]
    if unused:
        names = sorted({_generic_name(m) for linear in linears for m in linear.hf_modules})
        raise ConfigError(
            f"{source}: {unused[0]!r} names no tensor-parallel linear of the generator (LoRA can "
            f"target: {', '.join(names)})"
        )
    return chosen


def check_targets(arch, target_modules: list[str], rank: int, impl: str = "auto") -> None:
    """``resolve_targets`` on the model built on the meta device (no memory, no weights): a bad
    ``target_modules``, or a ``rank`` above a target's width (an adapter bigger than the weight it
    adapts, with no more capacity than a rank of min(in, out): a typo that would allocate it all),
    fails in one line before the real networks are built and loaded."""
    from adm_megatron.families import family_of_arch

    model = family_of_arch(arch).build_model(arch, impl=impl, device="meta")
    targets = resolve_targets(model, target_modules, default_key_mapping(model))
    narrowest = min(targets, key=lambda t: min(t.in_features, t.out_features))
    width = min(narrowest.in_features, narrowest.out_features)
    if rank > width:
        raise ConfigError(f"model.lora.rank={rank}: above the width of {narrowest.path} (in {narrowest.in_features}, "
                          f"out {narrowest.out_features}); expected a rank <= {width}")


def default_key_mapping(model: torch.nn.Module) -> KeyMapping:
    """The megatron -> diffusers key mapping of ``model``'s family."""
    from adm_megatron.families import family_of_arch

    arch = model.arch
    family = family_of_arch(arch)
    return lambda state: family.megatron_to_hf(state, arch)
