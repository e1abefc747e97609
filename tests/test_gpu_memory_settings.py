"""tools/gpu_memory_settings.py: every variant in its own torchrun writes its figures and the driver
merges them (a smoke run on CPU), and ``holders`` names the module global that keeps a tensor alive
(what the GPU run reports when memory outlives a deleted trainer)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from tool_scripts import load_tool


def test_holders_names_the_global_that_keeps_a_tensor_alive(monkeypatch):
    tool = load_tool("gpu_memory_settings")
    module = types.ModuleType("leaky_registry")
    tensor = torch.zeros(1024)

    class Holder:
        def __init__(self):
            self.state = {"moments": [tensor]}

    module.CURRENT = Holder()
    monkeypatch.setitem(sys.modules, "leaky_registry", module)
    chain = tool.holders([torch.zeros(3), tensor])
    assert chain[0] == "module leaky_registry, global 'CURRENT'", chain
    assert chain[1:-1] in (["Holder.state", "dict['moments']", "list[0]"],  # Python >= 3.11: inline attributes
                           ["Holder", "dict['state']", "dict['moments']", "list[0]"]), chain
    assert chain[-1].startswith("Tensor (1024,) torch.float32"), chain
    assert tool.holders([]) is None


@pytest.mark.slow
def test_the_smoke_run_measures_every_variant_in_its_own_world(tmp_path):
    out = tmp_path / "memory_settings.json"
    subprocess.run([sys.executable, "tools/gpu_memory_settings.py", "--smoke", "--out", str(out)], check=True,
                   timeout=600)
    data = json.loads(out.read_text())
    assert data["world_size"] == 1
    variants = data["variants"]
    assert list(variants) == ["baseline", "offload optimizer", "offload optimizer+params"]
    for name, result in variants.items():
        assert len(result["losses"]) == 2 and result["losses"][0], name
        assert result["max_loss_difference_to_baseline"] <= 1e-6, name  # offload moves, never changes
