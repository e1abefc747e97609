"""FP8 GEMMs in the local spec's linears through torchao's float8 training: ``model.fp8=tensorwise``,
``rowwise`` or ``rowwise_with_gw_hp`` (torchao's recipe names; where Transformer Engine is not
installed -- with TE, ``model.fp8=hybrid | e4m3`` runs TE's delayed scaling, ``models/fp8.py``).

Each linear of the DiT blocks (fused QKV, output projection, feed-forward; not the adaLN or embedding
layers, whose few rows would gain nothing) computes its GEMMs in FP8 with dynamic scaling: the scales
come from the operands of that very call, so nothing is kept between iterations and checkpoints are
unchanged (weights and gradients stay in their own dtype).

- ``tensorwise``: one scale per tensor (e4m3 forward, e5m2 gradients), all three GEMMs in FP8: the
  fastest recipe.
- ``rowwise``: a scale per row of each operand (e4m3), all three GEMMs in FP8: more accurate.
- ``rowwise_with_gw_hp``: as ``rowwise`` for the forward and input-gradient GEMMs, the weight gradient
  in high precision.

With data parallelism every recipe gives what one process gives for the same micro-batches (a
call's scales span its own tokens only). Context parallelism is refused (``config.py``): each rank's
copy of the text tokens gets a partial gradient, and FP8's scales and rounding of partial gradients
do not add up to one process's (measured: 3.5e-2 relative in a text projection's weight gradient even
with per-row scales).

The GEMM is torchao's ``matmul_with_hp_or_float8_args`` -- what its ``Float8Linear`` runs -- applied
to megatron-core's parallel linears, which torchao's module swap (``convert_to_float8_training``, for
``torch.nn.Linear``) does not reach. FP8 runs where a call communicates nothing (one tensor-parallel
rank, no sequence parallelism: ``models/linears.py``), so TP > 1 is refused too. Inner dimensions that
are not multiples of 16 are padded (torchao's ``pad_inner_dim``), so any shape runs; on a CPU torch
computes the same scaled GEMMs (slowly: for tests), on CUDA they need compute capability 8.9 (Ada,
Hopper) or later.
"""

from __future__ import annotations

import dataclasses

import torch

from adm_megatron.config import FP8_TORCHAO_RECIPES
from adm_megatron.mcore_compat import quiet_import_notices
from adm_megatron.models.fp8 import check_fp8_card



def _torchao_float8():
    """torchao's float8 training pieces; ImportError when torchao is missing or too old. Its import
    notices about C++ kernels and triton (not used here) are dropped (``mcore_compat.IMPORT_NOTICES``)."""
    quiet_import_notices()
    from torchao.float8.config import Float8LinearConfig
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    return Float8LinearConfig, matmul_with_hp_or_float8_args, LinearMMConfig, ScaledMMConfig


def check_local_fp8(fp8: str | None, spec: str, capability: tuple[int, int] | None) -> None:
    """One-line ValueError when ``model.fp8`` (a torchao recipe) cannot run here."""
    if fp8 not in FP8_TORCHAO_RECIPES:
        return
    if spec != "local":
        raise ValueError(f"model.fp8={fp8} runs in the local spec's linears, and this run builds Transformer Engine's "
                         "(model.impl=auto with TE installed, or te): set model.impl=local, or use TE's FP8 "
                         "(model.fp8=hybrid)")
    try:
        _torchao_float8()
    except ImportError as err:
        raise ValueError(f"model.fp8={fp8} needs torchao's float8 training (pip install 'torchao>=0.16'): "
                         f"{err}") from None
    check_fp8_card(fp8, capability)
    if capability is None and fp8 != "tensorwise" and not cpu_has_rowwise_scaled_mm():
        raise ValueError(f"model.fp8={fp8}: this torch ({torch.__version__}) multiplies FP8 on the CPU with per-tensor "
                         "scales only (torch._scaled_mm; per-row from torch 2.13): use model.fp8=tensorwise on the "
                         "CPU, or a GPU")


def cpu_has_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` takes per-row scales (the rowwise recipes' GEMM):
    torch 2.11's stops on an internal assertion, torch 2.13's computes it."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


class Float8Gemm:
    """``F.linear(input, weight, bias)`` with the GEMMs in FP8 under torchao recipe ``recipe``."""

    def __init__(self, recipe: str):
        float8_config, self._matmul, mm_config, scaled_mm_config = _torchao_float8()
        self.recipe = recipe
        self.config = dataclasses.replace(float8_config.from_recipe_name(recipe), pad_inner_dim=True)
        c = self.config
        self.mm_config = mm_config(*(
            scaled_mm_config(c.emulate, gemm.use_fast_accum, False, c.pad_inner_dim)
            for gemm in (c.gemm_config_output, c.gemm_config_grad_input, c.gemm_config_grad_weight)
        ))

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the operands in the dtype F.linear would compute in (autocast's, as torch.nn.Linear under it)
        kind = input.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else input.dtype
        with torch.autocast(kind, enabled=False):
            out = self._matmul.apply(input.to(dtype), weight.to(dtype).t(), self.mm_config, self.config)
            return out if bias is None else out + bias.to(dtype)


def enable_local_fp8(network: torch.nn.Module, fp8: str | None) -> int:
    """Give the local linears of ``network``'s blocks FP8 GEMMs under recipe ``fp8`` (one of
    :data:`FP8_TORCHAO_RECIPES`; anything else leaves them as they are). Returns how many linears."""
    if fp8 not in FP8_TORCHAO_RECIPES:
        return 0
    from adm_megatron.models.linears import LocalWhenAlone

    gemm = Float8Gemm(fp8)
    linears = [m for m in network.blocks.modules() if isinstance(m, LocalWhenAlone)]
    for linear in linears:
        linear.fp8_gemm = gemm
    return len(linears)
