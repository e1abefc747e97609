"""What a benchmark result records besides its timings: the machine, the versions, the peak
FLOP/s that MFU divides by; and the printed table."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch

from adm_megatron.versions import STACK, installed_version

# Dense BF16 tensor-core peaks (TFLOP/s, SXM parts, no sparsity) by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"


def peak_tflops(name: str, dtype: str, given: float | None) -> float | None:
    """``given`` (``--peak-tflops``) if set; else the table's BF16 peak for a known card running
    bf16; else None (MFU is then reported as n/a)."""
    if given is not None:
        return given
    if dtype != "bf16":
        return None
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def environment(device: torch.device, command: str) -> dict:
    """The device, the date, ``command`` (the command line that measured) and the versions."""
    return {
        "device": device_name(device),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "python": platform.python_version(),
        "versions": {name: installed_version(name) for name in STACK},  # as checkpoints and --version
        "cuda": torch.version.cuda,
    }


def _fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def format_table(rows: list[dict]) -> str:
    """One line per measurement: name, median seconds, TFLOP/s, MFU, peak memory, evaluations (or a note)."""
    lines = [f"{'measurement':38s} {'median s':>10s} {'TFLOP/s':>10s} {'MFU':>7s} {'peak GiB':>9s}  "
             "network evaluations (calls x batch) / note"]
    for r in rows:
        peak = r.get("peak_memory_bytes")
        mfu = _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f", "%")
        lines.append(
            f"{r['name']:38s} {r['median_s']:10.4g} {_fmt(r.get('tflops_per_s'), '.4g'):>10s} {mfu:>7s} "
            f"{_fmt(None if peak is None else peak / 2**30, '.2f'):>9s}  {r.get('evaluations') or r.get('note', '')}"
        )
    return "\n".join(lines)
