"""Build a tiny random but complete diffusers pipeline directory, offline (tests, smoke runs).

    python tools/make_tiny_pipeline.py --out outputs/tiny_teacher [--like cogvideox-2b] [--seed 0]

``--like`` names the model it is shaped after: a family's tiny pipeline (``cogvideox-2b``,
``cogvideox-5b``: rotary embeddings, head dim 16; ``sd3-medium``, ``sd3.5``: QK norm). The component
sizes are in ``adm_megatron/data/tiny_pipeline.py`` / ``tiny_sd3_pipeline.py``; encode prompts for
them with ``tools/precompute_text_embeddings.py --max-length 16``.

    python tools/make_tiny_pipeline.py --pixel-encoder sam --out outputs/tiny_sam

writes instead a tiny random vision encoder (``sam`` or ``dinov2``, 4 layers) for ADP's pixel
discriminator (``distill.pixel_encoder_path``, with ``distill.pixel_layers`` in 1..4).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_megatron.data.tiny_pixel_encoders import LAYERS, save_tiny_encoder  # noqa: E402
from adm_megatron.families import build_tiny_pipeline_named, tiny_pipeline_names  # noqa: E402
from adm_megatron.mcore_compat import quiet_import_notices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    quiet_import_notices()  # torchao's and torch's import-time notices (adm_megatron/mcore_compat.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--like", default="cogvideox-2b", choices=tiny_pipeline_names(),
                        help="the model the tiny pipeline is shaped after (default cogvideox-2b)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--pixel-encoder", choices=("sam", "dinov2"), default=None,
                        help="write a tiny vision encoder of this kind instead (ADP's distill.pixel_encoder_path; "
                        f"{LAYERS} layers: set distill.pixel_layers within 1..{LAYERS})")
    args = parser.parse_args(argv)
    # refused here, not by the builders, whose refusal names their Python argument (overwrite=True)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        print(f"make_tiny_pipeline.py: --out {args.out}: output directory is not empty (pass --overwrite)",
              file=sys.stderr)
        return 2
    if args.pixel_encoder:
        print(save_tiny_encoder(args.pixel_encoder, args.out, args.seed))
    else:
        print(build_tiny_pipeline_named(args.like, args.out, args.seed, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
