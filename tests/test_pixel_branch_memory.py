"""``tools/pixel_branch_memory.py`` on small probes (the published VAE / encoder widths, small
inputs): both VAEs and both encoders are measured with and without ``distill.pixel_recompute``,
the table and the JSON say so, recomputing lowers every VAE's and SAM's measured peak, and the
planner's fake-tensor count of each run is recorded beside it."""

from __future__ import annotations

import json

import pytest

from tool_scripts import load_tool

def _run(tmp_path, capsys, *extra) -> tuple[str, dict]:
    out = tmp_path / f"pixel{len(extra)}.json"
    capsys.readouterr()
    assert load_tool("pixel_branch_memory").main(["--out", str(out), "--cogvideox-probe", "1x4x4", "--sd3-probe", "8x8",
                         "--encoder-image-size", "64", *extra]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_pixel_branch_memory_smoke(tmp_path, capsys):
    table, report = _run(tmp_path, capsys)
    assert "| cogvideox VAE decode | yes |" in table and "| sam encoder | no |" in table
    assert {"torch", "diffusers", "transformers", "command", "device", "mode"} <= set(report)
    peaks = {(r["component"], r["recompute"]): r for r in report["rows"]}
    components = ("cogvideox VAE decode", "sd3 VAE decode", "sam encoder", "dinov2 encoder")
    assert set(peaks) == {(c, r) for c in components for r in (False, True)}
    assert peaks[("cogvideox VAE decode", False)]["probe_pixels"] == 32 * 32  # 1 latent frame -> 1 frame
    assert peaks[("sam encoder", True)]["image_size"] == 64
    for component in components[:3]:
        assert 0 < peaks[(component, True)]["peak_bytes"] < peaks[(component, False)]["peak_bytes"], component
        # the planner's count of the same run (fake tensors) sits beside each measurement
        assert 0 < peaks[(component, True)]["counted_peak_bytes"] < peaks[(component, False)]["counted_peak_bytes"]
    assert report["mode"] == "fp32"

    # a second run onto the same --out refuses before measuring (docs/bench holds committed figures)
    out = tmp_path / "pixel0.json"
    before = out.read_bytes()
    with pytest.raises(SystemExit) as refused:
        load_tool("pixel_branch_memory").main(["--out", str(out)])
    assert refused.value.code == 2 and out.read_bytes() == before
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"--out {out}: exists (earlier measurements; pass --overwrite to replace them)")


@pytest.mark.slow
def test_pixel_branch_memory_under_bf16_autocast(tmp_path, capsys):
    """``--autocast bf16`` (how a model.dtype=bf16 run computes the branch; bf16 convolutions are slow
    on a CPU: about 6 min here) measures every row in that mode."""
    table, report = _run(tmp_path, capsys, "--autocast", "bf16", "--encoders", "dinov2")
    assert report["mode"] == "bf16 autocast" and "per unit (bf16 autocast)" in table
    assert len(report["rows"]) == 6 and all(r["peak_bytes"] > 0 for r in report["rows"])
