"""Throughput benchmark: ``adm-megatron bench`` (see ``--help`` and README "Benchmarking").

    python tools/bench_throughput.py --model cogvideox-2b --layers 4 --out bench.json
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("adm_megatron") is None:  # not installed (pip install -e .): use the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
