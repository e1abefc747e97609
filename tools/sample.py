"""Render prompts with an exported generator and the teacher: ``adm-megatron sample`` (see ``--help``).

    python tools/sample.py --pipeline /models/CogVideoX-2b --generator outputs/run/generator \\
        --prompt "a cat walking on the sea" --steps 8 --out outputs/samples
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("adm_megatron") is None:  # not installed (pip install -e .): use the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
