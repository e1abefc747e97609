"""``adm-megatron``: the command line. ``train`` runs a distillation from a YAML config with dotted
``key=value`` overrides, in one process or under torchrun / srun (one process per GPU);
``collect-ode`` collects the teacher's ODE pairs (the real samples of DMD2, ADP's data) with the
teacher and layout of such a config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from adm_megatron.config import ConfigError, load_config

NONFINITE_EXIT_CODE = 3  # train.max_skipped_steps updates in a row were NaN / Inf (or nan_policy=error)


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
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.preemption import PREEMPTED_EXIT_CODE
    from adm_megatron.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    try:
        result = Trainer(config).fit()
    except NonFiniteError as err:
        print(f"adm-megatron: training stopped: {err}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return PREEMPTED_EXIT_CODE if result.preempted else 0
    if result.preempted:
        print(f"run stopped by a signal after iteration {result.iterations} ({result.trained} trained now); "
              f"checkpoint saved in {result.output_dir}: run the same command to go on")
        return PREEMPTED_EXIT_CODE
    print(f"run finished: {result.iterations} iterations ({result.trained} trained now), "
          f"outputs in {result.output_dir}")
    if result.generator_dir:
        print(f"generator (diffusers format): {result.generator_dir}")
    for path in result.samples:
        print(f"sample: {path}")
    return 0


def _collect_ode(args: argparse.Namespace) -> int:
    from adm_megatron.ode_collection import collect_ode_pairs

    config = load_config(args.config, args.overrides)
    manifest = collect_ode_pairs(config, args.out, args.num_pairs, args.shard_size, args.steps,
                                 args.batch_size, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ode pairs: {manifest['num_pairs']} in {len(manifest['shards'])} shards, {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adm-megatron",
        description="Distil CogVideoX diffusion transformers into few-step generators (ADM / DMD / DMD2) "
        "on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a distillation",
        description="Run a distillation. Many processes: torchrun --nproc-per-node N -m "
        "adm_megatron.cli train --config FILE ... (or srun with one task per GPU). Started again "
        "with the same command, a run goes on from its latest checkpoint in output_dir "
        "(train.resume=auto | never | PATH); a finished run does nothing.",
        epilog="exit codes: 0 done; 2 bad config or input (one line, before training); 3 stopped for "
        "NaN / Inf (train.max_skipped_steps); 75 stopped by SIGTERM / SIGUSR1 after saving a "
        "checkpoint (run the same command to go on).",
    )
    train.add_argument("--config", required=True, help="YAML run config (see examples/cogvideox/)")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides in YAML syntax, e.g. train.max_iterations=10 distill.method=dmd2",
    )
    train.set_defaults(func=_train)
    collect = sub.add_parser(
        "collect-ode",
        help="collect the teacher's ODE pairs (x_T, x_0, prompt id)",
        description="Sample the teacher's multi-step PF-ODE with CFG (model.teacher, "
        "distill.guidance_scale, the prompts and latent size of data.*, the layout of parallel.* "
        "of the config) and write (x_T, x_0, prompt id, CFG scale) as safetensors shards plus a "
        "manifest. Resumable: rerun the same command to finish a killed collection. Many "
        "processes: torchrun / srun as for train (each data-parallel rank writes its own shards).",
    )
    collect.add_argument("--config", default=None,
                         help="a run config (YAML) naming the teacher and data (or give them as overrides)")
    collect.add_argument("--out", required=True, help="output directory (new, or an unfinished collection)")
    collect.add_argument("--num-pairs", type=int, required=True)
    collect.add_argument("--shard-size", type=int, default=256, help="pairs per shard (default 256)")
    collect.add_argument("--steps", type=int, default=50, help="teacher PF-ODE steps (default 50)")
    collect.add_argument("--batch-size", type=int, default=64, help="pairs sampled at once (default 64)")
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    collect.set_defaults(func=_collect_ode)
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
