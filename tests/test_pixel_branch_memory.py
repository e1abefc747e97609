"""``tools/pixel_branch_memory.py`` on small probes (the published VAE / encoder widths, small
inputs): both VAEs and both encoders are measured with and without ``distill.pixel_recompute``,
the table and the JSON say so, and recomputing lowers every VAE's and SAM's measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pixel_branch_memory_smoke(tmp_path):
    out = tmp_path / "pixel.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pixel_branch_memory.py"), "--out", str(out),
           "--cogvideox-probe", "1x4x4", "--sd3-probe", "8x8", "--encoder-image-size", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| cogvideox VAE decode | yes |" in result.stdout and "| sam encoder | no |" in result.stdout
    report = json.loads(out.read_text())
    assert {"torch", "diffusers", "transformers", "command", "cpu"} <= set(report)
    peaks = {(r["component"], r["recompute"]): r for r in report["rows"]}
    components = ("cogvideox VAE decode", "sd3 VAE decode", "sam encoder", "dinov2 encoder")
    assert set(peaks) == {(c, r) for c in components for r in (False, True)}
    assert peaks[("cogvideox VAE decode", False)]["probe_pixels"] == 32 * 32  # 1 latent frame -> 1 frame
    assert peaks[("sam encoder", True)]["image_size"] == 64
    for component in components[:3]:
        assert 0 < peaks[(component, True)]["peak_bytes"] < peaks[(component, False)]["peak_bytes"], component
