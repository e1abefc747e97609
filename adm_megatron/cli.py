"""``adm-megatron``: the command line. ``train`` runs a distillation from a YAML config with dotted
``key=value`` overrides, in one process or under torchrun / srun (one process per GPU); ``plan``
prints the per-GPU memory plan of such a run on a card (``adm_megatron.memory``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from adm_megatron.config import ConfigError, load_config
from adm_megatron.memory.command import add_arguments as add_plan_arguments
from adm_megatron.memory.command import run as run_plan


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    # megatron-core logs every DDP bucket's parameter list at INFO; keep its warnings only
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed")


def _train(args: argparse.Namespace) -> int:
    from adm_megatron.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    result = Trainer(config).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run finished: {result.iterations} iterations, outputs in {result.output_dir}")
        if result.generator_dir:
            print(f"generator (diffusers format): {result.generator_dir}")
        for path in result.samples:
            print(f"sample: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adm-megatron",
        description="Distil CogVideoX diffusion transformers into few-step generators (ADM / DMD2) "
        "on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a distillation",
        description="Run a distillation. Many processes: torchrun --nproc-per-node N -m "
        "adm_megatron.cli train --config FILE ... (or srun with one task per GPU).",
    )
    train.add_argument("--config", required=True, help="YAML run config (see examples/cogvideox/)")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides in YAML syntax, e.g. train.max_iterations=10 distill.method=dmd2",
    )
    train.set_defaults(func=_train)
    plan = sub.add_parser(
        "plan",
        help="per-GPU memory of a run per network and phase, and whether it fits a card",
        description="Per-GPU memory plan of a run: weights, grads and optimizer state of each network, "
        "activations and transient buffers of each ADM phase, the peak, and whether it fits the card. "
        "Exit status 0: fits, 1: does not fit, 2: bad config or layout.",
    )
    add_plan_arguments(plan)
    plan.set_defaults(func=run_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"adm-megatron: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
