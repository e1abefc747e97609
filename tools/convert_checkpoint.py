"""Convert a model between a diffusers directory and an adm_megatron megatron-core checkpoint.

    python tools/convert_checkpoint.py hf-to-megatron --model cogvideox --hf-path HF_DIR --out CKPT
    python tools/convert_checkpoint.py megatron-to-hf --model cogvideox --ckpt CKPT --out HF_DIR

Runs as one process or under torchrun / srun (every rank runs the same command):

    torchrun --nproc-per-node 2 tools/convert_checkpoint.py hf-to-megatron ... --tensor-parallel 2

The megatron checkpoint is a megatron-core distributed checkpoint (torch_dist) plus
adm_megatron_checkpoint.json (format version, model family, diffusers architecture config). It does not depend
on the layout that wrote it: a checkpoint written at any tensor / context parallel size is read at
any other. --tensor-parallel / --context-parallel only choose the layout of this run (default 1 and
1: every process of the world holds the whole model, i.e. data parallel). megatron-to-hf writes a
``save_pretrained`` directory that the family's diffusers class (``CogVideoXTransformer3DModel`` for
--model cogvideox) loads with ``from_pretrained``. --model names the model family (the registry in
adm_megatron/families); it must match the source's.

Outputs appear atomically (written to OUT.tmp-<id>, renamed at the end); an existing non-empty
--out is replaced only with --overwrite. Exit status: 0 done, 2 bad arguments or inputs (checked
before any process group starts: missing directories, an existing --out, a checkpoint whose JSON,
metadata or shard files are missing or cut short, sizes that do not divide; or, once read, weights
that do not match their config.json), 1 the conversion failed; either way one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

if importlib.util.find_spec("adm_megatron") is None:  # not installed (pip install -e .): use the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "bfloat16", "float16")
PROG = "convert_checkpoint.py"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        _fail(f"{message} (see --help)")


def _is_main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _fail(message: str, code: int = 2):
    if _is_main_rank():
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    from adm_megatron.families import family_names  # the registry: cheap to import (no torch)

    parser = _Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Launch with torchrun --nproc-per-node N (or srun) for N processes; the world size must "
            "be divisible by tensor-parallel x context-parallel."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, choices=family_names(), help="model family (%(choices)s)")
        p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
        p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="tensor-parallel size of this run (default 1)")
        p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                       help="context-parallel size of this run (default 1)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    h2m = sub.add_parser(
        "hf-to-megatron",
        help="diffusers directory -> megatron checkpoint",
        description="Read a diffusers model directory (config.json + safetensors) and write a "
        "megatron-core distributed checkpoint.",
    )
    h2m.add_argument("--hf-path", required=True, metavar="DIR",
                     help="diffusers model directory (e.g. CogVideoX-2b/transformer), or a pipeline "
                     "directory with one in transformer/ (or a Hugging Face repo id in the local hub cache)")
    common(h2m)
    h2m.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                     help="parameter dtype stored in the checkpoint (default auto: the diffusers weights' own, "
                     "float32 when they mix; the round trip then gives them back bit for bit)")

    m2h = sub.add_parser(
        "megatron-to-hf",
        help="megatron checkpoint -> diffusers directory",
        description="Read an adm_megatron megatron checkpoint (written at any layout) and write a "
        "diffusers save_pretrained directory (dtype as stored in the checkpoint).",
    )
    m2h.add_argument("--ckpt", required=True, metavar="DIR", help="adm_megatron megatron checkpoint")
    common(m2h)
    return parser


def _world_size() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            try:
                return int(os.environ[key])
            except ValueError:
                _fail(f"environment variable {key}={os.environ[key]!r} is not an integer")
    return 1


def _refuse_training_checkpoint(path: str) -> None:
    """A training checkpoint (``iter_NNNNNNN``) or a run directory holds several networks: name the
    generator's checkpoint inside it, and ``adm-megatron export`` (which takes the EMA, as the run
    exports), instead of calling it no checkpoint."""
    from adm_megatron.train.checkpoint import STATE_FILE, latest_checkpoint

    ckpt = path if os.path.isfile(os.path.join(path, STATE_FILE)) else latest_checkpoint(path)
    if ckpt is not None:
        _fail(f"--ckpt {path}: a training {'checkpoint' if ckpt == path else 'run'}, not one network's; convert its "
              f"generator with --ckpt {os.path.join(ckpt, 'generator')} (the raw weights), or run adm-megatron "
              f"export --checkpoint {path} (what the run exports: its EMA where it keeps one)")


def _hold_training_checkpoint(args):
    """megatron-to-hf of a training checkpoint's network (``iter_N/generator``): a hold on ``iter_N``
    against the pruning of a run still training (``adm_megatron/train/checkpoint_hold.py``);
    otherwise nothing to hold."""
    import contextlib

    from adm_megatron.train.checkpoint_hold import CheckpointGone, CheckpointHold

    parent = os.path.dirname(os.path.abspath(args.ckpt)) if args.command == "megatron-to-hf" else ""
    if not os.path.isfile(os.path.join(parent, "trainer_state.json")):
        return contextlib.nullcontext()
    try:
        return CheckpointHold(parent)
    except CheckpointGone as err:
        _fail(str(err))


def _check_inputs(args) -> int:
    """Everything that can be checked before a process group exists (cheap checks first, before
    torch is imported); returns num_attention_heads."""
    from adm_megatron.hub_cache import local_dir, not_found_hint  # no torch

    tp, cp = args.tensor_parallel, args.context_parallel
    if tp < 1 or cp < 1:
        _fail(f"--tensor-parallel and --context-parallel must be >= 1 (got {tp} and {cp})")
    world = _world_size()
    if world % (tp * cp):
        _fail(
            f"world size {world} is not divisible by tensor-parallel x context-parallel = {tp} x {cp}"
            f" (launch with torchrun --nproc-per-node {tp * cp} or a multiple)"
        )
    if args.command == "hf-to-megatron":  # a repo id: its snapshot in the local hub cache
        args.hf_path = local_dir(args.hf_path, "--hf-path")
    source, flag = (args.hf_path, "--hf-path") if args.command == "hf-to-megatron" else (args.ckpt, "--ckpt")
    if os.path.isfile(source) and os.path.basename(source) == "latest":  # a run's checkpoints/latest names one
        with open(source) as f:
            named = os.path.join(os.path.dirname(source), f.read().strip())
        _fail(f"{flag} {source}: a file naming the run's newest checkpoint; give {named}/generator")
    if not os.path.isdir(source):
        from adm_megatron.train.checkpoint import pruned_hint

        _fail(f"{flag} {source}: no such directory{not_found_hint(source)}{pruned_hint(source)}")
    from adm_megatron.convert.checkpoint import (CheckpointError, OutputNotEmptyError, check_output_dir,
                                                 transformer_dir_of, verify_checkpoint)

    try:
        check_output_dir(args.out, args.overwrite, source=source)
    except OutputNotEmptyError as exc:  # named for this command: its flag, not the Python argument
        _fail(f"--out: {exc.naming('--overwrite')}")
    except CheckpointError as exc:
        _fail(f"--out: {exc}")
    from adm_megatron.train.checkpoint import check_outside_runs

    try:
        check_outside_runs(args.out, "--out")  # a run's pruning would remove it
    except ValueError as exc:
        _fail(str(exc))
    if args.command == "hf-to-megatron":
        source = transformer_dir_of(source)  # a pipeline directory: its transformer/
    try:
        if args.command == "hf-to-megatron":
            if not os.path.isfile(os.path.join(source, "config.json")):
                _fail(f"--hf-path {source}: no config.json (a diffusers model directory expected)")
            from adm_megatron.families import family_of_model_dir

            family = family_of_model_dir(source)
            if family.name != args.model:
                _fail(f"--hf-path {source} holds a {family.name!r} model, not {args.model!r}")
            heads = family.arch_from_pretrained_dir(source).num_attention_heads
            from adm_megatron.models.diffusers_files import check_diffusers_weights

            check_diffusers_weights(source)  # a weight file cut short: one line, before any process group
        else:
            _refuse_training_checkpoint(source)
            meta = verify_checkpoint(source)
            if meta["model"] != args.model:
                _fail(f"--ckpt {source} holds a {meta['model']!r} model, not {args.model!r}")
            heads = int(meta["diffusers_config"]["num_attention_heads"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
        _fail(str(exc))
    if heads % tp:
        _fail(f"num_attention_heads={heads} is not divisible by --tensor-parallel {tp}")
    return heads


# megatron-core's import-time notices, not about this tool's work
_QUIET = (
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
)


def main(argv: list[str] | None = None) -> int:
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{message}")
    from adm_megatron.mcore_compat import quiet_import_notices  # no torch, no megatron-core

    quiet_import_notices()
    args = build_parser().parse_args(argv)
    hold = _hold_training_checkpoint(args)
    _check_inputs(args)

    import torch

    from adm_megatron.config import ConfigError
    from adm_megatron.convert.checkpoint import (
        CheckpointError,
        hf_to_megatron_checkpoint,
        megatron_to_hf_checkpoint,
    )
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    start = time.time()
    info = initialize_parallel(
        tensor_parallel=args.tensor_parallel, context_parallel=args.context_parallel, seed=1234
    )
    try:
        with hold:  # a read that fails because the checkpoint was pruned meanwhile says so (a ValueError)
            if args.command == "hf-to-megatron":
                out = hf_to_megatron_checkpoint(
                    args.hf_path, args.out, overwrite=args.overwrite,
                    params_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                )
                what = "megatron checkpoint"
            else:
                out = megatron_to_hf_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
                what = "diffusers model"
    except (CheckpointError, OSError, ValueError) as exc:  # anything else keeps its traceback
        if info.is_main:
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ConfigError) else 1  # bad input found on reading it (weights unlike config)
    finally:
        destroy_parallel()
    if info.is_main:
        print(f"wrote {what} {out} ({info.layout}) in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
