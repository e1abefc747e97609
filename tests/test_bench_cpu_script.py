"""``tools/bench_cpu.sh`` keeps earlier figures: an OUT_DIR that already holds one of its JSON files
(e.g. the committed ``docs/bench``) is refused before anything runs -- the benchmark of the older tree
it runs first has no ``--overwrite`` check and would replace its file -- unless ``OVERWRITE=1``."""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["cpu_before.json", "cpu_after.json", "cpu_after_compiled.json"])
def test_an_out_dir_with_earlier_figures_is_refused_before_anything_runs(name, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / name).write_text('{"earlier": true}')
    marker = tmp_path / "python_ran"
    python = tmp_path / "python"  # a stand-in that records being started
    python.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    python.chmod(0o755)
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "bench_cpu.sh"), str(out)],
                          env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"{out / name} exists" in done.stderr
    assert not marker.exists()
    assert (out / name).read_text() == '{"earlier": true}'
