"""The scripts under tools/ loaded as modules, so that a test calls their ``main`` in its own process
(a fresh interpreter per call costs seconds of imports)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """``tools/NAME.py`` as a freshly executed module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
