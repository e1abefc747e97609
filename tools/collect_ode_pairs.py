"""Collect the teacher's ODE pairs (x_T, x_0, prompt id, CFG scale): ``adm-megatron collect-ode``.

    python tools/collect_ode_pairs.py --config examples/cogvideox/toy_adm.yaml --out outputs/toy_pairs \\
        --num-pairs 2048 --shard-size 256 --steps 50
    torchrun --nproc-per-node 8 tools/collect_ode_pairs.py --config RUN.yaml --out DIR --num-pairs 100000

The teacher, CFG range, prompts, latent size and parallel layout come from the run config (as
``adm-megatron train`` reads them); see ``adm_megatron/ode_collection.py`` and
``adm_megatron/data/ode_pairs.py`` for the format. A killed collection resumes with the same command.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("adm_megatron") is None:  # not installed (pip install -e .): use the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["collect-ode", *sys.argv[1:]]))
