"""Build a tiny random but complete CogVideoX pipeline directory, offline (tests, smoke runs).

    python tools/make_tiny_pipeline.py --out /tmp/tiny-cogvideox [--seed 0] [--rope]

See ``adm_megatron/data/tiny_pipeline.py`` for the component sizes. Run the pipeline with
``max_sequence_length=16``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_megatron.data import build_tiny_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--rope", action="store_true",
                        help="5b-style transformer: rotary embeddings, head dim 16")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    print(build_tiny_pipeline(args.out, args.seed, args.rope, args.overwrite))


if __name__ == "__main__":
    main()
