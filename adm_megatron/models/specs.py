"""ModuleSpecs of the CogVideoX block: the local spec (megatron-core parallel linears, SDPA) and the
Transformer Engine spec (TE linears and TE attention), the same layer class for both.

The TE spec is importable only where Transformer Engine imports (it needs CUDA); ``select_spec``
chooses it when asked for and available, and says why not otherwise.
"""

from __future__ import annotations

import logging

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from adm_megatron.models.adaln import AdaLNZero
from adm_megatron.models.attention import JointSelfAttention, JointSelfAttentionSubmodules
from adm_megatron.models.cogvideox_layer import CogVideoXLayer, CogVideoXLayerSubmodules
from adm_megatron.models.core_attention import SDPACoreAttention
from adm_megatron.models.feed_forward import FeedForward, FeedForwardSubmodules
from adm_megatron.models.linears import ColumnParallelLinear, RowParallelLinear
from adm_megatron.models.norms import LayerNorm

logger = logging.getLogger("adm_megatron")


def _layer_spec(column_linear, row_linear, core_attention, mlp=MLP, mlp_submodules=MLPSubmodules) -> ModuleSpec:
    return ModuleSpec(
        module=CogVideoXLayer,
        submodules=CogVideoXLayerSubmodules(
            adaln=AdaLNZero,
            self_attention=ModuleSpec(
                module=JointSelfAttention,
                submodules=JointSelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    q_layernorm=LayerNorm,
                    k_layernorm=LayerNorm,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                ),
            ),
            mlp=ModuleSpec(
                module=mlp,
                submodules=mlp_submodules(linear_fc1=column_linear, linear_fc2=row_linear),
            ),
        ),
    )


def local_layer_spec() -> ModuleSpec:
    """megatron-core's own parallel linears (as ``F.linear`` where a call communicates nothing, see
    ``models.linears``), the bias-in-GEMM ``FeedForward`` and torch SDPA: runs anywhere, CPU included."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, SDPACoreAttention, FeedForward, FeedForwardSubmodules)


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine linears and attention (BF16 / FP8 kernels); needs TE and CUDA."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    from adm_megatron.models.te_core_attention import TECoreAttention

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TECoreAttention)


def transformer_engine_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises several kinds of errors when its CUDA libraries are missing
        return False
    return True


def select_spec(impl: str = "auto") -> ModuleSpec:
    """``impl``: 'local', 'te' (error if unavailable) or 'auto' (TE when it imports)."""
    if impl not in ("auto", "local", "te"):
        raise ValueError(f"model implementation {impl!r}: expected 'auto', 'local' or 'te'")
    if impl == "local" or (impl == "auto" and not transformer_engine_available()):
        return local_layer_spec()
    if not transformer_engine_available():
        raise ValueError("model implementation 'te': Transformer Engine with CUDA is not available here")
    logger.info("CogVideoX blocks use the Transformer Engine spec")
    return te_layer_spec()
