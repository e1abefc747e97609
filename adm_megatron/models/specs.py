"""ModuleSpecs of the DiT blocks (CogVideoX, SD3): the local spec (megatron-core parallel linears,
SDPA) and the Transformer Engine spec (TE linears and TE attention), the same layer classes for both.

``select_kernels`` picks the implementation (the TE one only where Transformer Engine imports: it
needs CUDA) and says why not otherwise; ``select_spec`` / ``select_sd3_spec`` build each family's
block spec from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from adm_megatron.models.adaln import AdaLNZero
from adm_megatron.models.attention import JointSelfAttention, JointSelfAttentionSubmodules
from adm_megatron.models.cogvideox_layer import CogVideoXLayer, CogVideoXLayerSubmodules
from adm_megatron.models.core_attention import SDPACoreAttention
from adm_megatron.models.feed_forward import FeedForward, FeedForwardSubmodules
from adm_megatron.models.linears import ColumnParallelLinear, RowParallelLinear
from adm_megatron.models.norms import LayerNorm, RMSNorm
from adm_megatron.models.sd3_attention import MMDiTAttention, MMDiTAttentionSubmodules
from adm_megatron.models.sd3_layer import SD3Layer, SD3LayerSubmodules

logger = logging.getLogger("adm_megatron")


@dataclass(frozen=True)
class Kernels:
    """The implementation-specific parts of a block: parallel linears, the attention core and the
    feed-forward module (with its submodules dataclass)."""

    column_linear: type
    row_linear: type
    core_attention: type
    mlp: type = MLP
    mlp_submodules: type = MLPSubmodules


def _mlp_spec(kernels: Kernels) -> ModuleSpec:
    return ModuleSpec(
        module=kernels.mlp,
        submodules=kernels.mlp_submodules(linear_fc1=kernels.column_linear, linear_fc2=kernels.row_linear),
    )


def _self_attention_spec(kernels: Kernels, qk_norm: type | None) -> ModuleSpec:
    return ModuleSpec(
        module=JointSelfAttention,
        submodules=JointSelfAttentionSubmodules(
            linear_qkv=kernels.column_linear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
            core_attention=kernels.core_attention,
            linear_proj=kernels.row_linear,
        ),
    )


def _layer_spec(kernels: Kernels) -> ModuleSpec:
    return ModuleSpec(
        module=CogVideoXLayer,
        submodules=CogVideoXLayerSubmodules(
            adaln=AdaLNZero,
            self_attention=_self_attention_spec(kernels, LayerNorm),
            mlp=_mlp_spec(kernels),
        ),
    )


def sd3_layer_spec(kernels: Kernels, qk_norm: bool) -> ModuleSpec:
    """The SD3 block; ``qk_norm``: per-head RMSNorm on q / k of both streams (SD3.5), and of the
    image-only second attention of dual-attention blocks (SD3.5-Medium)."""
    norm = RMSNorm if qk_norm else None
    return ModuleSpec(
        module=SD3Layer,
        submodules=SD3LayerSubmodules(
            attention=ModuleSpec(
                module=MMDiTAttention,
                submodules=MMDiTAttentionSubmodules(
                    linear_qkv=kernels.column_linear,
                    linear_added_qkv=kernels.column_linear,
                    q_layernorm=norm,
                    k_layernorm=norm,
                    added_q_layernorm=norm,
                    added_k_layernorm=norm,
                    core_attention=kernels.core_attention,
                    linear_proj=kernels.row_linear,
                    linear_added_proj=kernels.row_linear,
                ),
            ),
            attention2=_self_attention_spec(kernels, norm),
            mlp=_mlp_spec(kernels),
        ),
    )


def local_kernels() -> Kernels:
    """megatron-core's own parallel linears (as ``F.linear`` where a call communicates nothing, see
    ``models.linears``), the bias-in-GEMM ``FeedForward`` and torch SDPA: runs anywhere, CPU included."""
    return Kernels(ColumnParallelLinear, RowParallelLinear, SDPACoreAttention, FeedForward, FeedForwardSubmodules)


def te_kernels() -> Kernels:
    """Transformer Engine linears and attention (BF16 / FP8 kernels); needs TE and CUDA."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    from adm_megatron.models.te_core_attention import TECoreAttention

    return Kernels(TEColumnParallelLinear, TERowParallelLinear, TECoreAttention)


def local_layer_spec() -> ModuleSpec:
    """The CogVideoX block on the local kernels."""
    return _layer_spec(local_kernels())


def te_layer_spec() -> ModuleSpec:
    """The CogVideoX block on the Transformer Engine kernels."""
    return _layer_spec(te_kernels())


def transformer_engine_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises several kinds of errors when its CUDA libraries are missing
        return False
    return True


def spec_kind(impl: str) -> str:
    """'te' or 'local': the block spec ``impl`` builds on this machine (see ``select_kernels``)."""
    return "te" if impl == "te" or (impl == "auto" and transformer_engine_available()) else "local"


def select_kernels(impl: str = "auto") -> Kernels:
    """``impl``: 'local', 'te' (error if unavailable) or 'auto' (TE when it imports)."""
    if impl not in ("auto", "local", "te"):
        raise ValueError(f"model implementation {impl!r}: expected 'auto', 'local' or 'te'")
    if impl == "local" or (impl == "auto" and not transformer_engine_available()):
        return local_kernels()
    if not transformer_engine_available():
        raise ValueError("model implementation 'te': Transformer Engine with CUDA is not available here")
    logger.info("DiT blocks use the Transformer Engine spec")
    return te_kernels()


def select_spec(impl: str = "auto") -> ModuleSpec:
    """The CogVideoX block spec for ``impl`` (see ``select_kernels``)."""
    return _layer_spec(select_kernels(impl))


def select_sd3_spec(impl: str = "auto", qk_norm: bool = False) -> ModuleSpec:
    """The SD3 block spec for ``impl`` (see ``select_kernels``)."""
    return sd3_layer_spec(select_kernels(impl), qk_norm)
