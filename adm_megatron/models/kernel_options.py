"""The run config's kernel choices for a built backbone: ``model.attention_backend``, ``model.fp8``
and ``model.compile`` (``models.attention_backend``, ``models.fp8``, ``models.compile``), checked
against this machine (``model.fp8``: Transformer Engine's recipes in ``models.fp8``, torchao's in
``models.fp8_torchao``) before anything is built (``check_kernel_options``) and applied to each
megatron model after it is built (``apply_kernel_options``), by the trainer and the benchmark alike.
Compilation is lazy (the first call traces), so LoRA hooks and dtype casts added after it are
compiled in."""

from __future__ import annotations

import torch

from adm_megatron.config import ModelConfig
from adm_megatron.models.attention_backend import check_backend
from adm_megatron.models.compile import check_compile, compile_blocks
from adm_megatron.models.core_attention import set_attention_backend
from adm_megatron.models.fp8 import check_fp8, device_capability, enable_fp8
from adm_megatron.models.fp8_torchao import check_local_fp8, enable_local_fp8
from adm_megatron.models.specs import spec_kind

_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def check_kernel_options(model: ModelConfig, head_dim: int) -> None:
    """One-line ValueError for an attention backend, FP8 or compile setting this machine cannot run."""
    spec = spec_kind(model.impl)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_backend(model.attention_backend, spec, device, _COMPUTE_DTYPES[model.dtype], head_dim)
    check_fp8(model.fp8, spec, device_capability())
    check_local_fp8(model.fp8, spec, device_capability())
    check_compile(model.compile, device)


def apply_kernel_options(network: torch.nn.Module, model: ModelConfig) -> None:
    """Set the attention backend, the FP8 recipe and the compilation of a built backbone."""
    set_attention_backend(network, model.attention_backend)
    enable_fp8(network, model.fp8, model.fp8_margin, model.fp8_amax_history_len, model.fp8_amax_compute_algo)
    enable_local_fp8(network, model.fp8)
    compile_blocks(network, model.compile)
