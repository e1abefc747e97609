"""``adm-megatron sample``: samples from an exported generator through its model family's diffusers
pipeline with its N-step schedule (optionally with CFG, the paper's "ADM w/ CFG"), beside the
teacher's own multi-step sampling, and the seconds per sample of each on this device.

The family comes from the transformer's ``config.json`` (``adm_megatron.families``). Prompts are
encoded with the pipeline's own text encoder(s) as the pipeline would (the family's
``encode_prompts``), the negative prompt is the empty string; rendering is the family's
``render_samples`` (whose deterministic few-step schedule is the PF-ODE the generator was distilled
on). The generator's step count and size default to the ones it was distilled for (the
``distillation.json`` the trainer exports beside it; the teacher renders at the same size; a size
is checked in one line by ``models/pipeline_size.py``). Writes ``OUT/generator/``, ``OUT/teacher/`` and
``OUT/sample_timing.json``; an earlier non-empty ``OUT`` is replaced only when asked (or finished:
``resume``). Launched as
several processes (torchrun / srun, a GPU each), the ranks split the prompts into contiguous shares
and rank 0 gathers the paths and timings: the files are those of one process, in 1 / ranks of the
time (an evaluation set of thousands of prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adm_megatron.convert.checkpoint import CHECKPOINT_META_FILE, output_holds
from adm_megatron.convert.distillation_record import DISTILLATION_FILE, read_distillation_record
from adm_megatron.data.batch_layout import contiguous_share
from adm_megatron.diffusion.schedules import VPVPredSchedule, schedule_from_diffusers_config
from adm_megatron.hub_cache import not_found_hint
from adm_megatron.json_file import write_json_atomically
from adm_megatron.families.registry import PromptEmbeddings
from adm_megatron.models.frame_files import check_writer, sample_name, write_grid
from adm_megatron.models.diffusers_files import check_diffusers_weights
from adm_megatron.models.generator_source import (LORA_WEIGHTS, check_lora_fits, generator_parts, not_a_generator_hint,
                                                   teacher_transformer)
from adm_megatron.models.pipeline_files import component_config, missing_components, read_config
from adm_megatron.models.pipeline_size import FLAGS, PipelineScale, pipeline_scale
from adm_megatron.parallel import barrier, initialize_parallel, launch_env
from adm_megatron.parallel.run_lock import LOCK_FILE, RunLock
from adm_megatron.parallel.shared_dir import check_shared_dir
from adm_megatron.sample_options import check_guidance, check_out_modes, check_prompts, check_seed, check_steps
from adm_megatron.train.checkpoint import check_outside_runs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleRun:
    name: str  # 'generator' or 'teacher'
    transformer_dir: str | None  # None: the pipeline's own transformer (the teacher)
    steps: int
    guidance_scale: float

    def flag(self, what: str) -> str:
        """The option that sets this run's ``what`` ('steps' or 'guidance-scale')."""
        return f"--{what}" if self.name == "generator" else f"--teacher-{what}"


def _note(message: str) -> None:
    """A note on stderr, from the first process of a launch only (every rank reaches the same one)."""
    if launch_env().rank == 0:
        print(f"adm-megatron sample: note: {message}", file=sys.stderr)


def generator_steps(generator_dir: str, steps: int | None) -> int:
    """The generator's sampling steps: ``steps`` when given (a note on stderr when it differs from
    the distilled count), else the count in its ``distillation.json``; one-line ValueError when
    neither says, or ``steps`` is below 1."""
    if steps is not None:  # before the note below, which is for a count that can run
        check_steps("--steps", steps)
    if not os.path.isdir(generator_dir):
        raise ValueError(f"--generator {generator_dir}: not found{not_found_hint(generator_dir)} (a generator "
                         "directory adm-megatron train or export wrote, or a diffusers transformer directory)")
    hint = not any(os.path.isfile(os.path.join(generator_dir, f)) for f in ("config.json", LORA_WEIGHTS)) and \
        not_a_generator_hint(generator_dir)
    if hint:  # a run's directory or a checkpoint: say where its generator is
        raise ValueError(f"--generator {generator_dir}: {hint}")
    record = read_distillation_record(generator_dir)
    if steps is None:
        if record is None:
            raise ValueError(f"--steps: {generator_dir} has no {DISTILLATION_FILE} (adm-megatron train writes it "
                             "into generator/); give the step count the generator was distilled for")
        return record["generator_steps"]
    if record is not None and steps != record["generator_steps"]:
        _note(f"{generator_dir} was distilled for {record['generator_steps']} steps; sampling it with {steps}")
    return steps


DEFAULT_TEACHER_GUIDANCE = 6.0  # CogVideoX's recommended CFG


def teacher_guidance(generator_dir: str, scale: float | None, default: float = DEFAULT_TEACHER_GUIDANCE) -> float:
    """The teacher's CFG: ``scale`` when given, else the middle of the CFG range the generator was
    distilled against (its ``distillation.json``: SD3.5-Large's 3-4 gives 3.5), else ``default`` (6)."""
    if scale is not None:
        return scale
    record = read_distillation_record(generator_dir)
    low, high = (record or {}).get("teacher_guidance_scale") or (default,) * 2
    return (low + high) / 2


def teacher_dir(pipeline_dir: str, generator_dir: str) -> str | None:
    """The transformer the teacher run renders: the teacher the generator was distilled from when its
    ``distillation.json`` names a transformer directory of its own (a fine-tuned teacher beside
    ``model.pipeline``), else None: the pipeline's own transformer -- unless that is a distilled
    generator itself (:func:`_recorded_teacher`)."""
    path = teacher_transformer(pipeline_dir, read_distillation_record(generator_dir))
    own = os.path.join(pipeline_dir, "transformer")
    if os.path.realpath(path) != os.path.realpath(own):
        return path
    record = read_distillation_record(own)
    return None if record is None else _recorded_teacher(own, record)


def _recorded_teacher(own: str, record: dict) -> str:
    """The teacher of a pipeline whose own transformer ``own`` is a distilled generator (it holds
    the ``distillation.json`` ``record``: ``export --pipeline-out`` writes such pipelines), which
    must never render as the teacher: the teacher ``record`` names (as :func:`teacher_transformer`
    finds it for the run's pipeline), with a note; a one-line ValueError when that is not here."""
    source = record.get("pipeline") or record.get("teacher")
    try:
        path = teacher_transformer(source, record) if source else None
    except ValueError:  # the recorded teacher is gone
        path = None
    if not (path and os.path.isfile(os.path.join(path, "config.json"))):
        raise ValueError(f"--teacher-steps: {own} is a distilled generator ({DISTILLATION_FILE}), not a teacher, and "
                         f"the teacher it was distilled from ({record.get('teacher')}) is not here: pass --teacher-steps "
                         "0, or give the teacher's own pipeline as --pipeline")
    _note(f"{own} is a distilled generator ({DISTILLATION_FILE}); the teacher run renders the teacher it was "
          f"distilled from, {path}")
    return path


def render_size(scale: PipelineScale, record: dict | None, native: tuple[int, int, int] | None,
                requested: dict) -> tuple[dict, tuple[int, int, int] | None]:
    """The pipeline call's size arguments and their latent size: each of ``requested`` (pixel
    ``height`` / ``width`` / ``num_frames``, None: not given) as given, else the size the generator
    was distilled at (its ``record``), else the transformer's ``native`` latent size; a note on stderr
    when the result is not the distilled size; one-line ValueError for a size the pipeline cannot take."""
    distilled = record.get("latent_size") if record else None
    default = distilled and (distilled["frames"], distilled["height"], distilled["width"]) or native
    size = {**(scale.pixels(*default) if default else {}), **{k: v for k, v in requested.items() if v is not None}}
    if not size:
        return {}, None
    missing = [FLAGS[k] for k in ("height", "width") + (() if scale.temporal is None else ("num_frames",))
               if k not in size]
    if missing:
        raise ValueError(f"{', '.join(missing)}: give the whole size (neither the generator nor its family says one)")
    latents = scale.latents(size)
    if distilled and latents != default:
        _note(f"the generator was distilled at latents {'x'.join(map(str, default))}; "
              f"sampling at {'x'.join(map(str, latents))}")
    return size, latents


def _note_other_teacher(pipeline_dir: str, generator_dir: str, record: dict | None) -> None:
    """A note when the generator's ``distillation.json`` (``record``) names another pipeline (or
    teacher) than ``pipeline_dir``: the prompts are encoded by this pipeline's text encoder(s) and
    decoded by its VAE, which must be the ones the generator was distilled with (a moved copy is fine)."""
    recorded = record and (record.get("pipeline") or record.get("teacher"))
    if not recorded:
        return
    same = {os.path.realpath(pipeline_dir), os.path.realpath(os.path.join(pipeline_dir, "transformer"))}
    if os.path.realpath(recorded) not in same:
        _note(f"{generator_dir} was distilled with {recorded} ({DISTILLATION_FILE}); sampling it through "
              f"--pipeline {pipeline_dir}, whose text encoder and VAE must be the same ones")
    teacher = record.get("teacher")
    if teacher and os.path.isfile(os.path.join(teacher, CHECKPOINT_META_FILE)):  # diffusers cannot render it
        _note(f"{generator_dir} was distilled from the megatron checkpoint {teacher} ({DISTILLATION_FILE}); the "
              f"teacher here{' and the LoRA base' if generator_parts(pipeline_dir, generator_dir)[1] else ''} is "
              f"--pipeline's own transformer, which must hold the same weights (convert_checkpoint.py "
              "megatron-to-hf gives them)")


def _check_pipeline(pipeline_dir: str, family, transformer: str) -> None:
    """One-line ValueError for a ``pipeline_dir`` that is not ``family``'s (``transformer``'s) pipeline
    or lacks a component it lists: sampling loads every one but the transformer (the text encoder(s)
    and tokenizer(s) to encode the prompts, the VAE and the scheduler to render)."""
    index = read_config(pipeline_dir, "model_index.json", "a diffusers pipeline")
    if index.get("_class_name") not in family.pipeline_classes:
        raise ValueError(f"--pipeline {pipeline_dir}: a {index.get('_class_name')} directory, but {transformer} is a "
                         f"{family.name} transformer (expected a {' or '.join(family.pipeline_classes)} directory)")
    missing = missing_components(pipeline_dir, index, [name for name in index if name != "transformer"])
    if missing:
        raise ValueError(f"--pipeline {pipeline_dir}: {', '.join(name + '/' for name in missing)} not found, which its "
                         "model_index.json lists (a whole diffusers pipeline directory is expected)")


def _check_step_counts(pipeline_dir: str, family, runs: list[SampleRun]) -> None:
    """One-line ValueError for a step count the pipeline's scheduler cannot sample: a discrete-time (VP)
    schedule has ``num_train_timesteps`` timesteps in all, and diffusers' CogVideoX schedulers refuse more
    steps (after the pipeline is loaded); flow matching takes any count, and a scheduler the family does
    not read is left to diffusers."""
    config = component_config(pipeline_dir, "scheduler", "scheduler_config.json")
    if config.get("_class_name") not in family.schedulers:
        return
    path = os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")
    try:
        schedule = schedule_from_diffusers_config(config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(schedule, VPVPredSchedule):
        return
    for run in runs:
        if run.steps > schedule.num_train_timesteps:
            raise ValueError(f"{run.flag('steps')} {run.steps}: expected at most {schedule.num_train_timesteps}, the "
                             f"timesteps of the pipeline's {config['_class_name']} (num_train_timesteps in {path})")


def _check_format(fmt: str, family) -> None:
    """One-line ValueError for a ``--format`` the family's samples are not written in, or that this
    environment cannot write."""
    formats = family.sample_formats()
    if fmt not in formats:
        raise ValueError(f"--format {fmt}: {family.name} samples are {family.latent_layout}s, written as "
                         f"{' or '.join(formats)}")
    check_writer(fmt)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU (diffusers' recommended inference dtype for these models), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


ARGS_FILE = "sample_args.json"  # what an output directory holds: a --resume must ask for the same
TIMING_FILE = "sample_timing.json"  # the seconds of every sample, kept over a --resume


def check_out_dir(out_dir: str, overwrite: bool, resume: bool, args: dict,
                  inputs: list[tuple[str, str]] = ()) -> None:
    """One-line ValueError for an ``out_dir`` that may not be written: a file; one that is or holds
    one of the ``inputs`` ((flag, directory) read to render, which ``overwrite`` would delete); one
    inside or holding a training run's checkpoints (``train.checkpoint.check_outside_runs``);
    non-empty without ``overwrite`` or ``resume``; resumed with other arguments than it was started with."""
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is a file")
    for flag, path in inputs:
        relation = output_holds(out_dir, path)
        if relation:
            raise ValueError(f"--out {out_dir}: {relation} the {flag} {path} it renders from; choose another --out")
    check_outside_runs(out_dir, "--out")  # not a run's: its pruning, or --overwrite, would remove it
    if not (os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {LOCK_FILE}) or overwrite:
        return
    if not resume:
        raise ValueError(f"--out {out_dir}: exists and is not empty (pass --overwrite to replace it, or --resume "
                         "to finish it)")
    path = os.path.join(out_dir, ARGS_FILE)
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"--resume: {path} is missing or unreadable: {out_dir} is not an adm-megatron sample "
                         "output") from None
    changed = [_difference(k, before.get(k), args.get(k)) for k in sorted(set(before) | set(args))
               if before.get(k) != args.get(k)]
    if changed:
        raise ValueError(f"--resume: {out_dir} was started with other arguments ({'; '.join(changed)}: {path}); "
                         "use a new --out or --overwrite")


RUN_FIELDS = ("transformer", "steps", "guidance scale")  # after the name, in sample_args.json's runs


def _difference(key: str, there, now) -> str:
    """One argument of ``sample_args.json`` that differs, as ``what: X there, Y now``; a run's fields by
    name (the generator's or the teacher's steps, ...), prompts by count."""
    if key == "runs" and isinstance(there, list) and isinstance(now, list):
        old, new = ({r[0]: r[1:] for r in runs if isinstance(r, list) and r} for runs in (there, now))
        parts = [f"{name}: {'absent' if name not in old else 'there'}, {'absent' if name not in new else 'now'}"
                 for name in sorted(set(old) ^ set(new))]
        for name in sorted(set(old) & set(new)):
            parts += [f"{name} {field}: {a!r} there, {b!r} now"
                      for field, a, b in zip(RUN_FIELDS, old[name], new[name]) if a != b]
        return "; ".join(parts)
    if key == "prompts" and isinstance(there, list) and isinstance(now, list):
        return f"prompts: {len(there)} there, {len(now)} now" if len(there) != len(now) else "prompts: other texts"
    return f"{key}: {there!r} there, {now!r} now"


def _missing(run_dir: str, share: range, fmt: str) -> list[range]:
    """The samples of ``share`` without a file in ``run_dir``, as contiguous ranges."""
    todo = [i for i in share if not os.path.isfile(os.path.join(run_dir, sample_name(i, fmt)))]
    groups: list[range] = []
    for i in todo:
        if groups and groups[-1].stop == i:
            groups[-1] = range(groups[-1].start, i + 1)
        else:
            groups.append(range(i, i + 1))
    return groups


def _rows(embeds: PromptEmbeddings, rows: range) -> PromptEmbeddings:
    """The prompts ``rows`` of ``embeds`` (the negatives are the one empty prompt)."""
    pooled = None if embeds.pooled is None else embeds.pooled[rows.start:rows.stop]
    return dataclasses.replace(embeds, text=embeds.text[rows.start:rows.stop], pooled=pooled)


def _world() -> tuple[int, int, torch.device]:
    """(rank, ranks, device) of this sampling process: one process, or the data-parallel world of
    a torchrun / srun launch (process groups from ``adm_megatron.parallel``, a GPU per rank)."""
    if launch_env().world_size == 1 and not dist.is_initialized():
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = initialize_parallel(tensor_parallel=1, context_parallel=1, seed=None)
    return info.dp_rank, info.dp_size, info.device


def _gathered(value, ranks: int) -> list:
    """Every rank's ``value``, in rank order."""
    if ranks == 1:
        return [value]
    out = [None] * ranks
    dist.all_gather_object(out, value)
    return out


def sample(pipeline_dir: str, runs: list[SampleRun], prompts: list[str], out_dir: str, fmt: str | None = None,
           seed: int = 0, command: str = "", dtype: str = "auto", overwrite: bool = False,
           resume: bool = False, size: dict | None = None, vae_tiling: bool = False) -> dict | None:
    """Render every prompt with every run; returns (and writes) the timing table on rank 0 (None on
    the other ranks). Launched as several processes, each renders a contiguous share of the prompts
    (sample i is the same file, from the same noise, as in one process). ``fmt`` None: mp4 for
    video families, png for image families (and a grid of them); ``dtype`` as :func:`resolve_dtype`;
    ``size``: the pixel ``height`` / ``width`` / ``num_frames`` asked for (the rest as
    :func:`render_size`: by default the generator's distilled size, for the teacher too);
    ``vae_tiling``: the pipelines' VAE decodes in tiles (less memory, blended seams).
    ``resume``: an output directory started with the same arguments keeps its sample files (each is
    written whole or not at all) and only the missing ones are rendered (and timed: the timing file
    keeps the earlier invocations' seconds of the others, :func:`_merged_seconds`); ``overwrite``
    (not with ``resume``) replaces it. Sample i's noise is seeded with ``seed`` + i (below 2**64)."""
    from adm_megatron.bench.report import environment
    from adm_megatron.families import family_of_model_dir

    check_prompts(len(prompts))
    check_out_modes(overwrite, resume)
    check_seed(seed, len(prompts))
    for run in runs:
        check_steps(run.flag("steps"), run.steps)
        check_guidance(run.flag("guidance-scale"), run.guidance_scale)
    if not os.path.isdir(pipeline_dir):
        raise ValueError(f"--pipeline {pipeline_dir}: not found{not_found_hint(pipeline_dir)} (a diffusers pipeline "
                         "directory)")
    transformer = generator_parts(pipeline_dir, runs[0].transformer_dir)[0]  # a LoRA file: its base
    family = family_of_model_dir(transformer)
    _check_pipeline(pipeline_dir, family, transformer)  # before anything is written, as the format below
    _check_step_counts(pipeline_dir, family, runs)
    arch = family.arch_from_pretrained_dir(transformer)
    video = family.latent_layout == "video"
    scale = pipeline_scale(pipeline_dir, read_config(transformer, "config.json", "transformer"), video)
    native = family.native_latent_size(arch) if family.native_latent_size else None
    record = read_distillation_record(runs[0].transformer_dir) if runs[0].transformer_dir else None
    size, latents = render_size(scale, record, native, size or {})
    fmt = fmt or family.sample_formats()[0]
    _check_format(fmt, family)
    args = {"pipeline": os.path.abspath(pipeline_dir), "prompts": prompts, "fmt": fmt, "seed": seed, "dtype": dtype,
            "size": size, "vae_tiling": vae_tiling,
            "runs": [[r.name, r.transformer_dir and os.path.abspath(r.transformer_dir), r.steps, r.guidance_scale]
                     for r in runs]}
    for run in runs:  # a cut copy of the weights: one line now, not a traceback from diffusers later
        run_transformer, lora_dir = generator_parts(pipeline_dir, run.transformer_dir)
        check_diffusers_weights(run_transformer)
        if lora_dir is not None:
            check_lora_fits(lora_dir, run_transformer)  # the file's header too: cut short, one line
    _note_other_teacher(pipeline_dir, runs[0].transformer_dir, record)
    inputs = [("--pipeline", pipeline_dir)] + [("--generator", part) for run in runs if run.transformer_dir
                                               for part in generator_parts(pipeline_dir, run.transformer_dir) if part]
    check_out_dir(out_dir, overwrite, resume, args, inputs)  # on every rank: a refusal stops them all
    rank, ranks, device = _world()
    torch_dtype = resolve_dtype(dtype, device)
    # one sample at a time in --out (the same job submitted twice, array tasks given one --out): taken
    # before --overwrite removes anything, held until the samples are written
    lock = RunLock(out_dir, rank == 0, "--out", "sample")
    try:
        if rank == 0:
            if overwrite:  # nothing of the earlier run stays beside the new files (but the lock just taken)
                for name in set(os.listdir(out_dir)) - {LOCK_FILE}:
                    path = os.path.join(out_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            write_json_atomically(os.path.join(out_dir, ARGS_FILE), args)  # a resumed --out compares it
        barrier()
        check_shared_dir(out_dir, "--out")  # each rank writes its share of the samples there
        mine = contiguous_share(len(prompts), rank, ranks)
        todo = {run.name: _missing(os.path.join(out_dir, run.name), mine, fmt) for run in runs}
        text_length = (record or {}).get("text_length")  # the run's prompt embeddings' length
        embeds = (family.encode_prompts(pipeline_dir, prompts[mine.start:mine.stop], arch, device, text_length=text_length)
                  if any(todo.values()) else None)
        earlier = _earlier_timing(out_dir, len(prompts)) if resume and rank == 0 else {"invocations": [], "runs": {}}
        rows = []
        for run in runs:
            seconds: list[float] = []
            run_dir = os.path.join(out_dir, run.name)
            for group in todo[run.name]:
                family.render_samples(pipeline_dir, run.transformer_dir,
                                      _rows(embeds, range(group.start - mine.start, group.stop - mine.start)),
                                      run.steps, run_dir, fmt=fmt, guidance_scale=run.guidance_scale, seed=seed,
                                      device=device, dtype=torch_dtype, seconds=seconds, first=group.start,
                                      vae_tiling=vae_tiling, **size)
            timed = dict(zip((i for group in todo[run.name] for i in group), seconds))  # sample -> its seconds
            timed = {i: t for share in _gathered(timed, ranks) for i, t in share.items()}
            paths = [os.path.join(run_dir, sample_name(i, fmt)) for i in range(len(prompts))]
            if rank == 0 and family.latent_layout == "image":  # images: also all of them in one grid
                write_grid(paths, os.path.join(run_dir, "grid.png"))
                paths.append(os.path.join(run_dir, "grid.png"))
            run_transformer, lora_dir = generator_parts(pipeline_dir, run.transformer_dir)
            rows.append({"model": run.name, "transformer": run_transformer, "lora": lora_dir, "steps": run.steps,
                         "guidance_scale": run.guidance_scale, "rendered": len(timed),
                         **_merged_seconds(earlier["runs"].get(run.name), timed, len(earlier["invocations"]),
                                           len(prompts)), "paths": paths,
                         "distillation": read_distillation_record(run.transformer_dir) if run.transformer_dir else None})
        if rank != 0:
            return None
        env = environment(device, command)
        result = {"environment": env, "invocations": earlier["invocations"] + [{"environment": env, "ranks": ranks}],
                  "pipeline": pipeline_dir, "prompts": prompts, "ranks": ranks,
                  "dtype": str(torch_dtype).removeprefix("torch."),
                  "size": {"pixels": size, "latents": latents and list(latents)}, "vae_tiling": vae_tiling, "runs": rows}
        write_json_atomically(os.path.join(out_dir, TIMING_FILE), result)
        return result
    finally:
        lock.release()


def _earlier_timing(out_dir: str, samples: int) -> dict:
    """What the timing file of a resumed ``out_dir`` keeps of its earlier invocations: their
    ``invocations`` and each run's per-sample ``seconds`` / ``timed_in``; none of them when it has no
    such file (an invocation killed before its end writes none) or one of another shape."""
    try:
        with open(os.path.join(out_dir, TIMING_FILE)) as f:
            before = json.load(f)
        runs = {r["model"]: (r["seconds"], r["timed_in"]) for r in before["runs"]
                if len(r["seconds"]) == len(r["timed_in"]) == samples}
        return {"invocations": list(before["invocations"]), "runs": runs}
    except (OSError, ValueError, KeyError, TypeError):
        return {"invocations": [], "runs": {}}


def _merged_seconds(earlier: tuple[list, list] | None, timed: dict[int, float], invocation: int,
                    samples: int) -> dict:
    """A run's per-sample timing: sample i's ``seconds`` as this invocation (number ``invocation``
    of the timing file's ``invocations``) measured it when it rendered sample i (``timed``), else as
    the ``earlier`` invocation that rendered it did (None: not known); ``timed_in`` says which one;
    the median over every timed sample."""
    seconds, timed_in = earlier or ([None] * samples, [None] * samples)
    seconds = [timed.get(i, t) for i, t in enumerate(seconds)]
    timed_in = [invocation if i in timed else k for i, k in enumerate(timed_in)]
    known = [t for t in seconds if t is not None]
    return {"seconds": seconds, "timed_in": timed_in, "timed": len(known),
            "seconds_per_sample": statistics.median(known) if known else None}


def format_timing(result: dict) -> str:
    lines = [f"{'model':10s} {'steps':>5s} {'CFG':>5s} {'rendered':>8s} {'timed':>6s} {'s / sample':>11s}  files"]
    for r in result["runs"]:
        timing = "-" if r["seconds_per_sample"] is None else f"{r['seconds_per_sample']:.4g}"
        lines.append(f"{r['model']:10s} {r['steps']:5d} {r['guidance_scale']:5.1f} {r['rendered']:8d} {r['timed']:6d} "
                     f"{timing:>11s}  {os.path.dirname(r['paths'][0])}/")
    return "\n".join(lines)
