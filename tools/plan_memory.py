"""Print the per-GPU memory plan of an ADM run: ``adm-megatron plan`` as a script.

    python tools/plan_memory.py --config examples/cogvideox/cogvideox_5b_8step.yaml --arch cogvideox-5b \\
        --gpus 8 --card 40 --json plan.json
"""

import sys

from adm_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
