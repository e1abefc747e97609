"""``tools/gpu_check.py --dry-run``: every section of the GPU check runs on the CPU at tiny sizes
and passes, so the script a lent GPU runs once (``tools/gpu_check.sh``) has not rotted; its
``trainer`` section runs the product end to end (a run with samples, the export, ``sample``)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_section_of_the_gpu_check_passes_in_a_dry_run(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", tool)  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    out = tmp_path / "gpu_check.json"
    threads = torch.get_num_threads()
    try:
        assert tool.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    finally:
        torch.set_num_threads(threads)  # the dry run sets its own
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and not report["errors"] and not report["skipped"]
    assert set(report["sections"]) == {"env", "matmul_peak", "correctness.2b", "correctness.5b", "te", "speed",
                                       "sdpa", "trainer", "decode_memory", "offload"}
    decode = report["sections"]["decode_memory"]
    assert decode["ok"] and all(r["counted_bytes"] > 0 and r["measured_bytes"] > 0 for r in decode["rows"].values())
    trainer = report["sections"]["trainer"]
    assert trainer["ok"] and all(trainer["checks"].values()) and len(trainer["checks"]) == 9
    offload = report["sections"]["offload"]
    assert offload["ok"] and offload["bit_identical"] and offload["checks"]["optimizer_state_in_checkpoint"]
    assert offload["checks"]["grad_accumulators_kept"] is True
    diagnosis = offload["diagnosis"]  # what bisects a disagreement on a GPU: all zero on the CPU
    per_iteration = diagnosis["per_iteration"]
    assert len(per_iteration) == 3 and not any(v for it in per_iteration for v in it.values())
    assert {"generator/loss", "generator/grad_norm", "discriminator/grad_norm"} <= set(per_iteration[0])
    assert diagnosis["optimizer_only"]["losses"] == 0 and diagnosis["optimizer_only"]["train_state"] == 0
    assert diagnosis["worst_weights"] == {} and diagnosis["worst_train_state"] == {}
