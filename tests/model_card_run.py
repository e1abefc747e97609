"""Runs the Python of an exported generator's README.md (``adm_megatron/convert/model_card.py``) as a
diffusers user would: in a fresh process, from the generator's directory, with ``"a prompt"`` and
the seed replaced; returns the frames it renders side by side (uint8 [H, frames x W, 3]), as
``adm-megatron sample --format png`` writes them. Fails when that code imports adm_megatron."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

_RUN = """
import sys, numpy as np
exec(open(sys.argv[1]).read())
assert not any(m.startswith("adm_megatron") for m in sys.modules), "the card imports adm_megatron"
frames = out.frames[0] if hasattr(out, "frames") else out.images
np.save(sys.argv[2], np.concatenate([np.asarray(f) for f in frames], axis=1))
"""


def card_code(directory: str) -> str:
    """The Python block of ``directory/README.md``."""
    with open(os.path.join(directory, "README.md")) as f:
        return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


def render_card(directory: str, prompt: str, seed: int, tmp_path) -> np.ndarray:
    code = card_code(directory).replace('"a prompt"', repr(prompt)).replace("manual_seed(0)", f"manual_seed({seed})")
    script, frames = tmp_path / "card.py", tmp_path / "card_frames.npy"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", _RUN, str(script), str(frames)], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(frames).astype(int)
