"""The installed versions of the stack a run, a checkpoint or a benchmark depends on (package
metadata, as pip sees it; None for what is not installed): recorded with each, and printed by
``adm-megatron --version`` for bug reports."""

from __future__ import annotations

import importlib.metadata
import platform

STACK = ("adm-megatron", "torch", "megatron-core", "transformer-engine", "torchao", "diffusers", "transformers")


def installed_version(dist: str) -> str | None:
    """torch's own ``__version__`` for torch: the PyPI CUDA wheels' metadata drops the build
    (``2.11.0`` for ``2.11.0+cu130``), which a bug report or a benchmark needs."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist == "torch":
        import torch

        return str(torch.__version__)  # a plain str: torch's TorchVersion neither YAML nor torch.load takes
    return version


def stack_versions() -> dict[str, str | None]:
    """Python's and each :data:`STACK` package's version."""
    return {"python": platform.python_version(), **{name: installed_version(name) for name in STACK}}
