"""The dtype keyword of ``from_pretrained`` for the installed diffusers / transformers: both renamed
``torch_dtype`` to ``dtype`` (transformers 5, diffusers 0.40), the old name deprecated with a
warning at every load, while the oldest versions setup.py allows know only ``torch_dtype``."""

from __future__ import annotations

import importlib.metadata

# the first release of each whose from_pretrained takes ``dtype``
_RENAMED_IN = {"transformers": (5, 0), "diffusers": (0, 40)}


def _release(dist: str) -> tuple[int, int]:
    major, minor = importlib.metadata.version(dist).split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def dtype_keyword(dist: str, dtype) -> dict:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, as ``dist`` (diffusers or transformers) takes it."""
    return {"dtype" if _release(dist) >= _RENAMED_IN[dist] else "torch_dtype": dtype}
