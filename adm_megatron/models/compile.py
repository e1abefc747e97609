"""Regional compilation of a DiT (``model.compile: blocks``): ``torch.compile`` of each transformer
block in place, as diffusers' ``compile_repeated_blocks`` does for its transformers.

What it buys is the fusion issue 14 asks for: inductor fuses each block's elementwise work -- the
adaLN LayerNorm and modulation, the per-segment cats, the gated residuals, the GELU, RoPE, the
q / k norms -- into a few kernels around the GEMMs and the attention, which stay library calls.
Every block has the same code, so one compiled graph serves them all (per shape and dtype;
``dynamic=False``: a training run has fixed shapes). ``nn.Module.compile`` keeps the module tree and
its parameter names, so checkpoints, DDP's gradient hooks, LoRA, recompute and the converters see
the same model. Megatron's collectives at TP > 1 are traced by dynamo or run between graphs (a graph
break), never changed. Values equal the eager model's within float rounding (tests/test_compile.py).
"""

from __future__ import annotations

import shutil

import torch


def check_compile(mode: str, device: torch.device, key: str = "model.compile") -> None:
    """One-line error before any building when ``mode`` cannot compile here: inductor's CPU code
    needs a C++ compiler on the PATH."""
    if mode == "blocks" and device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        raise ValueError(f"{key}=blocks on CPU needs a C++ compiler (c++ / g++) on the PATH for "
                           "torch.compile's inductor; install one or set model.compile=none")


# One ADM iteration calls a block in about 5 variants (grad on / off, the inputs requiring grad or
# not, batch B or 2B under CFG), each one graph; dynamo's default of 8 per code object would leave
# the variants of a longer run's validation or of a fourth network eager, with a warning.
BLOCK_GRAPHS = 32


def compile_blocks(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Compile each of ``model.blocks`` in place when ``mode`` is ``blocks``; returns ``model``."""
    if mode == "blocks":
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7's name
        setattr(config, limit, max(getattr(config, limit), BLOCK_GRAPHS))
        for block in model.blocks:
            block.compile(dynamic=False)
    return model
