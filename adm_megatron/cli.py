"""``adm-megatron``: the command line. ``train`` runs a distillation from a YAML config with dotted
``key=value`` overrides, in one process or under torchrun / srun (one process per GPU);
``collect-ode`` collects the teacher's ODE pairs (the real samples of DMD2, ADP's data) with the
teacher and layout of such a config; ``plan`` prints the per-GPU memory plan of such a run on a
card (``adm_megatron.memory``); ``bench`` measures throughput (our DiT against diffusers, each
phase of an iteration); ``sample`` renders an exported generator beside the teacher; ``export``
writes a training checkpoint's generator (its EMA) as the diffusers directory a finished run
exports."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings

from adm_megatron.config import ConfigError, keys_located, load_config
from adm_megatron.mcore_compat import quiet_import_notices

NONFINITE_EXIT_CODE = 3  # train.max_skipped_steps updates in a row were NaN / Inf (or nan_policy=error)
CHECKPOINT_FAILED_EXIT_CODE = 1  # a checkpoint could not be written; the previous one stays the latest


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
    quiet_import_notices()


def _refuse(line: str) -> int:
    """Print a one-line refusal and return exit code 2. In a multi-process launch that has not
    started yet the ranks first agree (adm_megatron/parallel/startup.py): the line is printed once,
    by the lowest rank with it, and the ranks that passed stop too instead of waiting for this one."""
    from adm_megatron.parallel.startup import agree_on_failure

    for text in agree_on_failure(line):
        print(text, file=sys.stderr)
    return 2


ONE_PROCESS = {  # commands that plan or measure in one process: under torchrun / srun, refused in one line
    "plan": "--gpus says how many GPUs the run will use",
    "bench": "it times one process on one device",
    "export": "it writes one directory from the whole checkpoint; every rank would read its own checkpoints/latest",
}


MANY_PROCESSES = ("train", "collect-ode", "sample")  # one process per GPU, started by torchrun / srun


def _check_one_process(command: str, print_only: bool = False) -> None:
    from adm_megatron.parallel import launch_env, slurm_batch_shell_tasks

    world = launch_env().world_size
    if command in ONE_PROCESS and world > 1:
        raise ConfigError(f"{command} runs in one process, not under torchrun / srun (this launch started {world}): "
                          f"run `adm-megatron {command} ...` as a plain command ({ONE_PROCESS[command]})")
    tasks = slurm_batch_shell_tasks()
    if command in MANY_PROCESSES and tasks and not print_only:  # it would wait for ranks nobody starts
        raise ConfigError(f"{command}: started by the batch script of SLURM job {os.environ.get('SLURM_JOB_ID')}, "
                          f"which asked for {tasks} tasks, not by srun: start one process per task with "
                          f"`srun python -m adm_megatron.cli {command} ...` (or torchrun), or ask for --ntasks=1")


def _peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is a collective's or the store's failure (another rank gone): torch.distributed's
    errors, and the RuntimeErrors gloo raises for a closed or reset connection."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "gloo" in text or "NCCL" in text or "Connection closed by peer" in text or "Connection reset" in text))


def _train(args: argparse.Namespace) -> int:
    from adm_megatron.convert.checkpoint import CheckpointError
    from adm_megatron.parallel import launch_env
    from adm_megatron.train.grad_sync import GradSyncError
    from adm_megatron.train.phases import NonFiniteError
    from adm_megatron.train.preemption import PREEMPTED_EXIT_CODE, startup_stop_in, stop_received
    from adm_megatron.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    if args.print_config:  # the run as it would start: the file, the overrides and every default
        import yaml

        from adm_megatron.config import config_to_dict
        from adm_megatron.parallel.startup import confirm_start

        confirm_start(config.parallel.timeout_s)  # under torchrun: a rank whose config failed waits for every rank
        if launch_env().rank == 0:  # once, not once per rank
            print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    try:
        with keys_located(config):
            result = Trainer(config).fit()
    except NonFiniteError as err:  # decided alike on every rank (all-reduced): said once
        if launch_env().rank == 0:
            print(f"adm-megatron: training stopped: {err}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except GradSyncError as err:  # a setting this model cannot take, found at its first update
        print(f"adm-megatron: training stopped: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # a checkpoint not written (the previous one stays the latest)
        print(f"adm-megatron: training stopped: {err}", file=sys.stderr)
        return CHECKPOINT_FAILED_EXIT_CODE
    except Exception as err:
        signalled = stop_received()
        if signalled is None or startup_stop_in(err) or not _peer_gone(err):
            raise  # an error of its own, a stop or not: a traceback
        # this rank got the stop, and a collective failed before it could save: the other ranks' end (one
        # stopped during its start-up: "connection closed" in this one's collective), not a bug
        print(f"adm-megatron: stopped by {signalled}, then ended by {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''} (another rank ended first); run the same command to "
              "go on from the latest checkpoint", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return PREEMPTED_EXIT_CODE if result.preempted else 0
    if result.preempted:
        print(f"run stopped by a signal after {result.iterations} iterations ({result.trained} trained now); "
              f"checkpoint saved in {result.output_dir}: run the same command to go on")
        return PREEMPTED_EXIT_CODE
    print(f"run finished: {result.iterations} iterations ({result.trained} trained now), "
          f"outputs in {result.output_dir}")
    if result.generator_dir:
        print(f"generator (diffusers format): {result.generator_dir}")
    lora = os.path.join(result.output_dir, "generator_lora")  # train.export_lora adapter / both
    if result.trained and os.path.isfile(os.path.join(lora, "distillation.json")):
        print(f"LoRA generator (its adapters, for load_lora_weights): {lora}")
    for path in result.samples:
        print(f"sample: {path}")
    return 0


def _collect_ode(args: argparse.Namespace) -> int:
    from adm_megatron.ode_collection import collect_ode_pairs

    config = load_config(args.config, args.overrides)
    with keys_located(config):
        manifest = collect_ode_pairs(config, args.out, args.num_pairs, args.shard_size, args.steps,
                                     args.batch_size, progress=not args.no_progress, verify=args.verify)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ode pairs: {manifest['num_pairs']} in {len(manifest['shards'])} shards, {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from adm_megatron.bench.run import BenchOptions, run_bench
    from adm_megatron.json_file import check_json_destination, write_json_atomically

    opts = BenchOptions(
        model=args.model, layers=args.layers, batch=args.batch, frames=args.frames, height=args.height,
        width=args.width, dtype=args.dtype, impl=args.impl, repeats=args.repeats, warmup=args.warmup,
        checkpoint_repeats=args.checkpoint_repeats, profile=args.profile,
        peak_tflops=args.peak_tflops, seed=args.seed, config=args.config, overrides=args.overrides,
        command=args.command_line,
    )
    if args.warmup == 0:  # the first round pays for allocations, kernel choices, lazy imports: on one side only
        print("adm-megatron bench: note: --warmup 0 times each side's first, cold round too; the ratio to diffusers "
              "is then not a fair one", file=sys.stderr)
    if args.out and os.path.exists(args.out) and not args.overwrite:  # before minutes of measuring
        print(f"adm-megatron bench: --out {args.out}: exists (an earlier measurement; pass --overwrite to replace "
              "it)", file=sys.stderr)
        return 2
    try:
        if args.out:
            check_json_destination(args.out, "--out")
        result = run_bench(opts)
    except ValueError as err:
        print(f"adm-megatron bench: {err}", file=sys.stderr)
        return 2
    layers = result['model']['num_layers']
    print(f"{result['environment']['device']}, {result['dtype']}, {layers} layer{'s' * (layers != 1)}, "
          f"{result['model']['latent_tokens']} latent + {result['model']['text_tokens']} text tokens, "
          f"batch {opts.batch}")
    print(result["table"])
    k = result["kernels"]
    chosen = ", ".join(sorted({c["backend"] for c in k["attention_auto_choices"]}))
    attention = k["attention_backend"] + (f" ({chosen})" if chosen else "")
    overlap = "on" if k["overlap_grad_reduce"] else "off"
    print(f"kernels: {k['spec']} spec, compile {k['compile']}, attention {attention}, fp8 {k['fp8'] or 'off'}, "
          f"DP grad overlap {overlap}")
    lora = result["adm"]["lora"]
    if lora is not None:
        print(f"LoRA generator: rank {lora['rank']}, alpha {lora['alpha']:g}, {lora['adapted_layers']} adapted layers "
              f"({', '.join(lora['target_modules'])}), {lora['trainable_parameters']} trainable parameters")
    ratio = result["dit"]["ratio_ours_over_diffusers"]
    print(f"time ours / diffusers: forward {ratio['forward']:.3f}, forward+backward {ratio['forward_backward']:.3f}")
    profiles = result["dit"].get("profile_forward_backward")
    if profiles:
        from adm_megatron.bench.kernel_profile import format_comparison

        print(f"DiT forward+backward by kernel kind ({profiles['ours']['events']}):\n{format_comparison(profiles)}")
        it = result["adm"]["profile_iteration"]
        print(f"{result['adm']['method']} iteration by kernel kind: its events {it['total_ms']:.1f} ms of "
              f"{it['wall_ms']:.1f} ms wall ({100 * it['total_ms'] / it['wall_ms']:.0f}%)\n"
              + format_comparison({"iteration": it}))
    if args.out:
        write_json_atomically(args.out, result)
        print(f"written: {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from adm_megatron.data.prompt_file import read_prompt_file
    from adm_megatron.hub_cache import local_dir
    from adm_megatron.parallel.startup import FailedElsewhere
    from adm_megatron.sample_options import check_sample_options

    try:
        if args.samples_per_prompt < 1:
            raise ValueError(f"--samples-per-prompt {args.samples_per_prompt}: expected >= 1")
        prompts = args.prompt + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
        prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]  # sample i: its own seed + i
        check_sample_options(args, len(prompts))  # before the imports below (megatron-core: seconds)
        from adm_megatron.sampling import (SampleRun, format_timing, generator_steps, sample, teacher_dir,
                                           teacher_guidance)

        args.pipeline = local_dir(args.pipeline, "--pipeline")  # a repo id: its snapshot in the local hub cache
        args.generator = local_dir(args.generator, "--generator")
        runs = [SampleRun("generator", args.generator, generator_steps(args.generator, args.steps), args.guidance_scale)]
        if args.teacher_steps:
            runs.append(SampleRun("teacher", teacher_dir(args.pipeline, args.generator), args.teacher_steps,
                                  teacher_guidance(args.generator, args.teacher_guidance_scale)))
        result = sample(args.pipeline, runs, prompts, args.out, fmt=args.format, seed=args.seed,
                        command=args.command_line, dtype=args.dtype, overwrite=args.overwrite, resume=args.resume,
                        size={"height": args.height, "width": args.width, "num_frames": args.num_frames},
                        vae_tiling=args.vae_tiling)
    except FailedElsewhere:
        return 2  # the ranks that failed say why
    except (ValueError, FileNotFoundError) as err:
        return _refuse(f"adm-megatron sample: {err}")
    if result is not None:  # rank 0
        print(f"{result['environment']['device']}, {result['ranks']} process(es)")
        print(format_timing(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from adm_megatron.convert.checkpoint import CheckpointError, OutputNotEmptyError
    from adm_megatron.train.checkpoint_export import export_checkpoint

    try:
        written, record = export_checkpoint(args.checkpoint, args.out, args.weights, args.overwrite, args.lora,
                                            args.pipeline_out)
    except OutputNotEmptyError as err:  # named for this command: its flag, not the Python argument
        return _refuse(f"adm-megatron export: {err.naming('--overwrite')}")
    except CheckpointError as err:
        return _refuse(f"adm-megatron export: {err}")
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"generator of iteration {record['iteration']} ({record['weights']} weights, "
              f"{record['generator_steps']} steps): {', '.join(written)}")
    return 0


class _PrintVersions(argparse.Action):
    """``--version``: adm-megatron's and its stack's versions on one line (argparse's own action wraps it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from adm_megatron.versions import stack_versions

        versions = stack_versions()
        print(f"adm-megatron {versions.pop('adm-megatron')} ("
              + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()) + ")")
        parser.exit()


class _StoreOnce(argparse.Action):
    """argparse's ``store`` for an option given at most once: given twice, the last silently won (two
    ``--config`` files, which a user may expect to layer, lost the first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not self.default:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, then {values!r}): give it "
                         "once")
        setattr(namespace, self.dest, values)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line naming the command (no usage block), exit status 2, said
    by the first rank of a launch only; its subcommands' parsers are of the same class. An option
    that takes a value is taken once (:class:`_StoreOnce`)."""

    def add_argument(self, *names, **kwargs):
        if names and names[0].startswith("-") and kwargs.get("action", "store") == "store":
            kwargs["action"] = _StoreOnce
        return super().add_argument(*names, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        from adm_megatron.parallel import launch_env

        try:
            first = launch_env().rank == 0
        except ValueError:  # a launch environment it cannot read: say it anyway
            first = True
        if first:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from adm_megatron.families import family_names, preset_names

    parser = _OneLineParser(
        prog="adm-megatron",
        description="Distil diffusion transformers (model families: " + ", ".join(family_names()) + ") into "
        "few-step generators (ADM / DMD / DMD2 / ADP) on megatron-core.",
    )
    parser.add_argument("--version", action=_PrintVersions,
                        help="the versions of adm-megatron and of the stack it runs on, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a distillation",
        description="Run a distillation. Many processes: torchrun --nproc-per-node N -m "
        "adm_megatron.cli train --config FILE ... (or srun with one task per GPU). Started again "
        "with the same command, a run goes on from its latest checkpoint in output_dir "
        "(train.resume=auto | never | PATH); a finished run does nothing.",
        epilog="exit codes: 0 done; 1 a checkpoint could not be written (one line; the previous one "
        "stays the latest); 2 bad config or input (one line, before training); 3 stopped for "
        "NaN / Inf (train.max_skipped_steps); 75 stopped by SIGTERM / SIGUSR1 after saving a "
        "checkpoint (run the same command to go on).",
    )
    train.add_argument("--config", required=True, help="YAML run config (see examples/cogvideox/, examples/sd35/)")
    train.add_argument("--print-config", action="store_true",
                       help="print the whole run config (the file, the overrides and every default, as the run "
                       "saves it in output_dir/config.yaml) and exit without training")
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
    collect.add_argument("--num-pairs", type=int, required=True, help="pairs to collect in all")
    collect.add_argument("--shard-size", type=int, default=256, help="pairs per shard (default 256)")
    collect.add_argument("--steps", type=int, default=50, help="teacher PF-ODE steps (default 50)")
    collect.add_argument("--batch-size", type=int, default=64, help="pairs sampled at once (default 64)")
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect.add_argument("--verify", action="store_true",
                         help="check a finished collection's shards against the manifest's SHA-256s (reading all of "
                         "them, each data-parallel rank its share) and collect those that differ again")
    collect.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    collect.set_defaults(func=_collect_ode)
    plan = sub.add_parser(
        "plan",
        help="per-GPU memory of a run per network and phase, and whether it fits a card",
        description="Per-GPU memory plan of a run: weights, grads and optimizer state of each network, "
        "activations and transient buffers of each phase of the run's method (ADM, DMD, DMD2, ADP; ADP's "
        "pixel branch counted on fake tensors from the pipeline's VAE and the encoder's config files), the "
        "peak, and whether it fits the card. "
        "Exit status 0: fits, 1: does not fit, 2: bad config or layout.",
    )
    from adm_megatron.memory import command as plan_command  # imports megatron-core: after the warning filters

    plan_command.add_arguments(plan)
    plan.set_defaults(func=plan_command.run)
    bench = sub.add_parser(
        "bench",
        help="measure throughput: our DiT vs diffusers, and each phase of a distillation iteration",
        description="In one run, alternating, medians of --repeats timings: our megatron DiT's forward "
        "and forward+backward and the same through the family's diffusers transformer with the same "
        "weights, dtype and inputs; then each phase and the whole iteration of a distillation through "
        "the trainer (ADM unless distill.method=... is given; on synthetic prompts, but dmd2 and adp read "
        "teacher ODE pairs, data.real_path, and keep the run's prompts, those the pairs were collected on: "
        "the pairs must be of the --model directory's teacher at the bench's latent size), with analytic "
        "model FLOPs, TFLOP/s, MFU "
        "(needs a known card or --peak-tflops), peak memory (GPU) and network evaluations per phase; "
        "then how long a checkpoint of that run stops training, synchronous and in the background "
        "(train.async_save). A preset has random weights (--seed); prints a table, writes JSON with --out.",
    )
    bench.add_argument("--model", required=True,
                       help=" | ".join(preset_names("bench")) + " (real shapes, random weights) or a diffusers "
                       "transformer / pipeline directory (or a Hugging Face repo id in the local hub cache)")
    bench.add_argument("--layers", type=int, default=None, help="presets only: number of blocks (to fit one card)")
    bench.add_argument("--batch", type=int, default=1, help="samples per call (default 1)")
    bench.add_argument("--frames", type=int, default=None, help="latent frames (default: the model's: CogVideoX 13, images 1)")
    bench.add_argument("--height", type=int, default=None, help="latent height (default: the model's: CogVideoX 60, SD3 128)")
    bench.add_argument("--width", type=int, default=None, help="latent width (default: the model's: CogVideoX 90, SD3 128)")
    bench.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp64"),
                       help="auto: bf16 on a GPU, fp32 on CPU. The DiT comparison holds both models in it; "
                       "the trainer runs model.dtype (bf16: BF16 autocast, the teacher held in bf16, the trainable weights "
                       "fp32 unless model.bf16_params)")
    bench.add_argument("--impl", default="auto", choices=("auto", "local", "te"),
                       help="our block spec: te (Transformer Engine), local (SDPA), auto; the trainer's model.impl "
                       "too. model.attention_backend / model.fp8 / model.compile overrides apply to both sections "
                       "(recorded in the JSON's kernels; diffusers' model stays eager)")
    bench.add_argument("--repeats", type=int, default=7, help="timed repeats, the median is reported (default 7)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    bench.add_argument("--checkpoint-repeats", type=int, default=2,
                       help="timed checkpoints of each kind, after an untimed one each (default 2; 0: none)")
    bench.add_argument("--peak-tflops", type=float, default=None,
                       help="peak TFLOP/s for MFU (default: the dense BF16 peak of a known card; none on CPU)")
    bench.add_argument("--profile", action="store_true",
                       help="also one forward+backward of each DiT, and one iteration, under torch.profiler: time by "
                            "kernel kind (attention, GEMM, normalisation, copies, ...) and the heaviest kernels, the "
                            "DiTs side by side; the iteration's kernel time against its wall time")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--config", default=None,
                       help="a run config for the trainer (the bench sets its model, dtype, latent size and batch, "
                       "and its prompts unless the method reads ODE pairs)")
    bench.add_argument("--out", default=None, help="write the result as JSON here (a new file, unless --overwrite)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    bench.add_argument("overrides", nargs="*", metavar="key=value",
                       help="trainer overrides, e.g. distill.generator_steps=8 distill.head_every=3 "
                       "model.attention_backend=auto model.fp8=hybrid (the keys the bench sets from its flags -- "
                       "data.batch_size / frames / height / width, model.dtype / impl -- are refused: use the "
                       "flags; so are data.source / num_prompts under a method that reads no ODE pairs)")
    bench.set_defaults(func=_bench)
    samp = sub.add_parser(
        "sample",
        help="render prompts with an exported generator (and the teacher), seconds per sample",
        description="Generate samples from an exported generator (a diffusers transformer directory, "
        "e.g. a run's generator/) through its model family's diffusers pipeline with its N-step "
        "schedule and at its size (both from the distillation.json the trainer exports beside it, or "
        "--steps / --height / --width / --num-frames), and with "
        "the teacher at --teacher-steps (the pipeline's own transformer, or the transformer directory the "
        "generator was distilled from when its distillation.json names one; a pipeline whose own transformer is a "
        "distilled generator, as export --pipeline-out writes, renders the teacher its distillation.json records, "
        "or refuses the teacher run when that is not here); writes OUT/generator/, "
        "OUT/teacher/ and OUT/sample_timing.json and prints seconds per sample. Many processes: "
        "torchrun --nproc-per-node N -m adm_megatron.cli sample ... (or srun) splits the prompts over them.",
    )
    samp.add_argument("--pipeline", required=True, help="the teacher's diffusers pipeline directory (VAE, text encoder, scheduler), or a Hugging Face "
                      "repo id in the local hub cache")
    samp.add_argument("--generator", required=True,
                      help="the exported generator: a diffusers transformer directory (a run's generator/) or a "
                      "LoRA directory (a run's generator_lora/: its adapters on the pipeline's transformer)")
    samp.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    samp.add_argument("--prompt-file", default=None,
                      help="a text file with one prompt per line (after the --prompt ones; blank lines skipped)")
    samp.add_argument("--steps", type=int, default=None,
                      help="generator steps (default: the count it was distilled for, from its distillation.json)")
    samp.add_argument("--guidance-scale", type=float, default=1.0,
                      help="CFG for the generator (default 1: none; > 1: the paper's 'ADM w/ CFG')")
    samp.add_argument("--teacher-steps", type=int, default=50, help="teacher steps (default 50; 0: no teacher)")
    samp.add_argument("--teacher-guidance-scale", type=float, default=None,
                      help="the teacher's CFG (default: the middle of the CFG range the generator was distilled "
                      "against, from its distillation.json, else 6; refused with --teacher-steps 0)")
    samp.add_argument("--format", default=None, choices=("mp4", "gif", "png"),
                      help="video families (CogVideoX) write mp4 (the default), gif or png (the frames side by side); "
                      "image families (SD3) write png only")
    samp.add_argument("--samples-per-prompt", type=int, default=1,
                      help="samples of each prompt (default 1), consecutive: prompt p's k-th is sample p x K + k")
    for flag, what in (("--height", "pixel height"), ("--width", "pixel width"), ("--num-frames", "video frames")):
        samp.add_argument(flag, type=int, default=None,
                          help=f"{what} of every sample, the generator's and the teacher's (default: the size the "
                          "generator was distilled at, from its distillation.json, else the transformer's native one)")
    samp.add_argument("--vae-tiling", action="store_true",
                      help="decode in overlapping tiles (diffusers' vae.enable_tiling: CogVideoX at 49 x 480 x 720 in "
                      "about a quarter of the memory, with blended seams)")
    samp.add_argument("--seed", type=int, default=0,
                      help="sample i starts from noise seeded by seed + i (default 0; a run's own samples: its seed)")
    samp.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                      help="pipeline dtype (default auto: bf16 on a GPU, fp32 on CPU)")
    samp.add_argument("--out", required=True, help="output directory (new or empty)")
    samp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    samp.add_argument("--resume", action="store_true",
                      help="finish an --out started with the same arguments (e.g. a preempted job): its sample files "
                      "are kept, only the missing ones rendered; sample_timing.json keeps the earlier invocations' "
                      "seconds of the samples they rendered")
    samp.set_defaults(func=_sample)
    export = sub.add_parser(
        "export",
        help="a training checkpoint's generator as a diffusers directory (its EMA, as a finished run exports)",
        description="Write the generator of a training checkpoint (checkpoints/iter_NNNNNNN, or a run "
        "directory: its latest) as the diffusers directory a finished run exports as generator/: its EMA "
        "weights when the run keeps an EMA (--weights auto), a LoRA generator as train.export_lora says, "
        "with distillation.json (the iteration, the weights, the step count adm-megatron sample uses) and a "
        "README.md with the diffusers call that samples it. "
        "One process, on CPU (host memory for the weights and a copy of them).",
    )
    export.add_argument("--checkpoint", required=True, help="a training checkpoint, or a run's output_dir or its checkpoints/latest (the latest)")
    export.add_argument("--out", required=True, help="output directory (new or empty, unless --overwrite)")
    export.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                        help="auto (default): the EMA when the run keeps one, else the trained weights; ema: "
                        "the EMA (refused when the run kept none); raw: the trained weights")
    export.add_argument("--lora", default=None, choices=("merged", "adapter", "both"),
                        help="a LoRA run's generator: merged into the weights (--out), the diffusers LoRA file "
                        "(into --out with _lora appended, as a run's generator_lora/), or both; default: the "
                        "run's train.export_lora")
    export.add_argument("--pipeline-out", default=None, metavar="DIR",
                        help="also write DIR: a whole diffusers pipeline to hand over (the run's pipeline copied, "
                        "the generator as its transformer, the scheduler it samples with, a README.md with "
                        "the DiffusionPipeline.from_pretrained call)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace non-empty outputs (never one that is, holds or lies inside the checkpoint or the "
                             "run's teacher or pipeline)")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (None: this process's own, ``sys.argv``); returns the exit code."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["train"]:
        return _command(argv)
    # train: a stop signal ends its start-up (the imports below take seconds, loading minutes) at once
    from adm_megatron.train.preemption import (PREEMPTED_EXIT_CODE, ignore_stop_signals, startup_stop_in,
                                               stops_end_startup)

    try:
        with stops_end_startup():
            code = _command(argv)
    except BaseException as err:
        stop = startup_stop_in(err)  # each rank that got the signal: a stop is sent to every task
        if stop is None:
            raise
        print(f"adm-megatron: stopped by {stop} during the start-up, before training; nothing new to save: run the "
              "same command to go on", file=sys.stderr)
        code = PREEMPTED_EXIT_CODE
    if own_process and code == PREEMPTED_EXIT_CODE:
        ignore_stop_signals()  # a second stop (SLURM's TERM, then the batch shell's USR1) would end the exit
    return code


def _command(argv: list[str]) -> int:
    from adm_megatron.parallel.startup import FailedElsewhere  # torch: seconds, after train's stop handler

    _setup_logging()  # first: building the parser imports megatron-core, whose import-time warnings it filters
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value on both sides of an option (argparse takes one run of positionals)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = shlex.join(["adm-megatron", *argv])
    try:
        _check_one_process(args.command, getattr(args, "print_config", False))
        return args.func(args)
    except FailedElsewhere:
        return 2  # the ranks that failed say why
    except ConfigError as err:
        return _refuse(f"adm-megatron: config error: {err}")


if __name__ == "__main__":
    sys.exit(main())
