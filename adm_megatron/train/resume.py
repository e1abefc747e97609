"""Where a run starts: fresh, from a checkpoint, or not at all (already finished).

``train.resume``:
- ``auto`` (default): go on from ``output_dir/checkpoints/latest`` if there is one; a run that
  already finished does nothing and writes nothing;
- ``never``: refuse to start when ``output_dir`` already holds a run;
- a path (a checkpoint ``.../iter_NNNNNNN`` or a run directory, whose latest checkpoint is used):
  start from that checkpoint, writing into ``output_dir``. Once ``output_dir`` has checkpoints of its
  own, a path outside it is where the run *started*: the run goes on from its own latest, as with
  ``auto`` (Megatron-LM's ``--load`` before ``--pretrained-checkpoint``), so that a requeued job, which
  runs the same command, does not go back to the path each time, and another run's checkpoint is
  never grafted onto this one's history. A path inside ``output_dir`` (an earlier checkpoint of its
  own) goes back to it: from this start on ``checkpoints/latest`` names it, and the same launch started
  again (a requeued SLURM job, torchrun's restart: the same command) goes on from the run's latest
  rather than going back again (``adm_megatron.train.run_starts``); a new job goes back again.

A run never writes into an ``output_dir`` that holds a different run: the current config is
compared with ``output_dir/config.yaml`` and with the checkpoint's config on every key except
those that may change between invocations (the parallel layout, which loading reshards, the
kernels, and how the run is logged, saved and exported) and keys newer than the run at their
defaults; the first differing key is named in one line. ``train.max_iterations`` may change when
every learning rate is constant (a finished run started again with more iterations goes on from
its last checkpoint), never below the iterations done. The global
batch (``data.global_batch_size``, or ``data.batch_size`` x data-parallel size when it is 0) must
stay the same; how it is split over ranks and micro-batches may change (``adm_megatron.data.batch_layout``:
the rows an iteration sees do not depend on the split), so a run saved on 8 GPUs goes on on 4 with
twice the micro-batches. A checkpoint whose files are damaged (``adm_megatron.train.checkpoint_files``) is
refused in one line naming the file and the newest whole checkpoint to start from instead. All of
it reads small files only, before any process group or model exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from adm_megatron.config import (
    METHOD_KEYS,
    NETWORKS,
    SOURCE_KEYS,
    Config,
    ConfigError,
    config_to_dict,
    flatten_keys,
)
from adm_megatron.convert.checkpoint import output_holds
from adm_megatron.data.batch_layout import global_batch
from adm_megatron.parallel.run_lock import LOCK_FILE
from adm_megatron.train.checkpoint import (
    STATE_FILE,
    checkpoints_root,
    latest_checkpoint,
    read_training_state,
)
from adm_megatron.train.checkpoint_files import check_whole, hold_checkpoint_from
from adm_megatron.train.checkpoint_hold import CheckpointHold
from adm_megatron.train.run_starts import earlier_rollback

_WAY_ON = "start from the newest whole one once with train.resume={}"
FINISHED = "finished.json"  # in output_dir, written when a run has exported everything
# keys that may differ between the invocations of one run (prefixes end in a dot)
MAY_CHANGE = (
    "parallel.", "model.sequence_parallel", "model.recompute", "model.recompute.", "model.impl", "data.batch_size",
    "data.global_batch_size",
    "model.attention_backend", "model.compile", "model.fp8", "model.fp8_margin", "model.fp8_amax_history_len",
    "model.fp8_amax_compute_algo", "model.grad_reduce_in_fp32",
    *(f"optim.{n}.{k}" for n in NETWORKS for k in ("shard_over_dp", "offload")),
    "train.resume", "train.keep_checkpoints", "train.save_every", "train.save_interval_minutes", "train.async_save",
    "train.log_every", "train.num_samples", "train.sample_every", "train.sample_vae_tiling", "train.export", "train.export_lora", "train.max_skipped_steps", "train.memory_check",
    "train.nan_policy", "logging.", "output_dir",
)


LENGTH = "train.max_iterations"  # may change with constant learning rates (_check_length)


@dataclass
class ResumePoint:
    checkpoint: str | None  # checkpoint directory to load, None for a fresh start
    iteration: int  # the first iteration to run
    finished: bool = False  # the run in output_dir is complete: nothing to do
    hold: CheckpointHold | None = None  # train.resume=PATH: held against its run's pruning until loaded
    note: str | None = None  # for the log: train.resume=PATH set aside for output_dir's own checkpoints
    # train.resume names an earlier checkpoint of output_dir's own run: the run goes back to it
    # (``latest`` names it from this start on: run_starts.earlier_rollback)
    rolled_back: bool = False


def _section_value(flat: dict, key: str):
    """``key``'s value in a flattened config: a leaf, or a section gathered back into a dict."""
    section = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
    return section or flat.get(key)


def _differing_key(key: str, before: dict, now: dict) -> str:
    """``key``, or the section above it that is null on one side (``model.lora: null`` against a
    LoRA run's ``model.lora.rank`` ... is ``model.lora`` that changed)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        section = ".".join(parts[:i])
        if (section in now and now[section] is None) or (section in before and before[section] is None):
            return section
    return key


def _another_run(config: Config) -> str:
    """What to do for a run that differs: a new output directory, or, when this one names another
    run's checkpoint (``train.resume=PATH``, which goes on with that run), no such resume."""
    if config.train.resume in ("auto", "never"):
        return "a different run needs a new output_dir"
    return ("train.resume=PATH goes on with that run; a different one starts without it (from that run's "
            "exported generator: model.generator_init)")


def _check_length(before: dict, now: dict, source: str, config: Config) -> None:
    """``train.max_iterations`` may change (a run lengthened, or shortened to no less than it has
    done: ``plan_resume``) when no network's learning rate decays over the run's length; otherwise
    the schedule of the iterations already done would change with it."""
    decaying = [f"optim.{n}.decay_style={now[f'optim.{n}.decay_style']}" for n in NETWORKS
                if now[f"optim.{n}.decay_style"] != "constant"]
    if decaying:
        raise ConfigError(
            f"{source}: train.max_iterations={before[LENGTH]!r} there but {now[LENGTH]!r} now; {decaying[0]} "
            f"decays the learning rate over the run's length, so the run cannot change it (a constant schedule "
            f"can; {_another_run(config)})"
        )


def _unread(key: str, config: Config) -> bool:
    """A key of another method's or data source's (``config.METHOD_KEYS``, ``SOURCE_KEYS``): it changes
    nothing in this run, so it may change (the method and the source themselves may not)."""
    return ((key in METHOD_KEYS and config.distill.method not in METHOD_KEYS[key])
            or (key in SOURCE_KEYS and config.data.source not in SOURCE_KEYS[key]))


def check_compatible(saved: dict, config: Config, source: str) -> None:
    """One-line ConfigError naming the first key that differs and may not (keys read by other methods
    only may: :func:`_unread`). A key the saved config
    does not have (added to adm_megatron after the run was saved) passes at its default value: a new
    key's default keeps the behaviour the run was trained with."""
    now = flatten_keys(config_to_dict(config))
    before = flatten_keys(saved)
    defaults = flatten_keys(config_to_dict(Config()))
    for key in sorted(set(now) | set(before)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE) or _unread(key, config):
            continue
        if key == LENGTH and now.get(key) != before.get(key):
            _check_length(before, now, source, config)
            continue
        if key not in before and key in defaults and now.get(key) == defaults[key]:
            continue
        if now.get(key) != before.get(key):
            key = _differing_key(key, before, now)
            there = (f"{key} absent there (the run is older than it: trained as its default "
                     f"{defaults[key]!r})" if key not in before and key in defaults and
                     _section_value(before, key) is None else f"{key}={_section_value(before, key)!r} there")
            raise ConfigError(
                f"{source}: {there} but {_section_value(now, key)!r} now; a run cannot change it ({_another_run(config)})"
            )


def _check_writable(out: str) -> None:
    """One-line ConfigError when ``out`` cannot be created or written: it, or the nearest existing
    directory above it, is a file or not writable (a traceback from the first write before)."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == os.path.abspath(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir={out!r} exists and is not a directory; expected a directory")
    if not os.path.isdir(existing):
        raise ConfigError(f"output_dir={out!r}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={out!r}: {existing} is not writable by this user")


def plan_resume(config: Config, world_size: int) -> ResumePoint:
    """Where this invocation starts (see the module docstring); one-line ConfigErrors."""
    out = config.output_dir
    _check_writable(out)
    saved_config = os.path.join(out, "config.yaml")
    holds_run = os.path.isfile(saved_config) or os.path.isdir(checkpoints_root(out))
    others = sorted(set(os.listdir(out)) - {LOCK_FILE}) if os.path.isdir(out) and not holds_run else []
    if others:  # another program's files, or this one's put there by hand: a run would write over them
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ConfigError(f"output_dir={out!r}: not empty ({shown}) and not a run of adm-megatron (no config.yaml "
                          "or checkpoints/); nothing was written: use a new or empty output_dir")
    resume = config.train.resume
    if resume == "never" and holds_run:
        raise ConfigError(
            f"output_dir={out!r} already holds a run and train.resume=never; nothing was written "
            "(use a new output_dir, or train.resume=auto to go on with it)"
        )
    if os.path.isfile(saved_config):
        with open(saved_config) as f:
            check_compatible(yaml.safe_load(f) or {}, config, saved_config)
    if resume == "never":
        return ResumePoint(None, 0)
    note = None
    own = latest_checkpoint(out)
    if own is None and os.path.isfile(os.path.join(out, FINISHED)):  # started again, it would train anew over its outputs
        raise ConfigError(f"output_dir={out!r}: the run there finished ({FINISHED}) but has no checkpoint to go on "
                          "from (checkpoints/ removed?); its outputs are kept and nothing was written: use a new "
                          "output_dir")
    if resume != "auto" and own is not None and output_holds(out, resume) not in ("is", "contains"):
        note = (f"train.resume={resume}: output_dir={out!r} has checkpoints of its own, so the run goes on from its "
                f"latest, {os.path.basename(own)} (a path outside output_dir is where a run starts)")
        resume = "auto"
    hold = None if resume == "auto" else hold_checkpoint_from(resume, "train.resume")  # another run's, maybe live
    rolled_back = (hold is not None and own is not None and output_holds(out, hold.path) == "contains"
                   and os.path.realpath(hold.path) != os.path.realpath(own))
    earlier = earlier_rollback(out, os.path.basename(hold.path)) if rolled_back else None
    if earlier is not None:  # this launch went back already: a requeue or restart goes on from what it did since
        note = (f"train.resume={resume}: this launch ({earlier['launch']}) went back to "
                f"{os.path.basename(hold.path)} at its start of {earlier['time_utc']}, so started again it goes on "
                f"from the run's latest, {os.path.basename(own)} (a new job goes back again)")
        hold.release()
        hold, resume, rolled_back = None, "auto", False
    ckpt = latest_checkpoint(out) if hold is None else hold.path
    if ckpt is None:
        return ResumePoint(None, 0)
    state_file = os.path.join(ckpt, STATE_FILE)
    try:
        state = read_training_state(ckpt)
    except ConfigError:
        if os.path.isfile(state_file) or resume == "auto":  # cut, or gone though checkpoints/latest names it
            check_whole(ckpt, _WAY_ON)
        raise
    check_compatible(state["config"], config, state_file)
    tp_cp = config.parallel.tensor_parallel * config.parallel.context_parallel
    saved_data = state["config"]["data"]
    before = global_batch(saved_data.get("global_batch_size", 0), saved_data["batch_size"],
                          state["layout"]["data_parallel"])
    d = config.data
    now = global_batch(d.global_batch_size, d.batch_size, world_size // tp_cp)
    if before != now:
        dp = world_size // tp_cp
        raise ConfigError(
            f"{state_file}: global batch was {before}, now {now} (data.global_batch_size={d.global_batch_size}, "
            f"data.batch_size={d.batch_size}, data-parallel size {dp}); a run cannot change it: "
            f"{_same_global_batch(before, d.batch_size, dp)}"
        )
    iteration = int(state["iteration"])
    if iteration > config.train.max_iterations:
        raise ConfigError(
            f"{state_file}: the run has done {iteration} iterations, more than train.max_iterations="
            f"{config.train.max_iterations}; a run can be lengthened, not cut below what it has done"
        )
    finished = (iteration == config.train.max_iterations and output_holds(out, ckpt) in ("is", "contains")
                and os.path.isfile(os.path.join(out, FINISHED)))
    if not finished:  # it will be loaded
        check_whole(ckpt, _WAY_ON)
    return ResumePoint(ckpt, iteration, finished, hold, note, rolled_back)


def _iteration(line: str) -> float:
    """A record's iteration; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def trim_metrics(output_dir: str, start: int) -> None:
    """Rank 0, before a resumed run logs: drop ``metrics.jsonl`` records of iterations from
    ``start`` on (work done after the checkpoint, which the run does again) and any line a kill cut
    short, atomically."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _iteration(line) < start]
    if kept == lines:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def mark_finished(output_dir: str, iterations: int) -> None:
    """Rank 0, once everything is exported: later invocations of the same run do nothing."""
    tmp = os.path.join(output_dir, f"{FINISHED}.tmp")
    with open(tmp, "w") as f:
        json.dump({"iterations": iterations}, f)
    os.replace(tmp, os.path.join(output_dir, FINISHED))


def _same_global_batch(before: int, batch_size: int, dp: int) -> str:
    """The settings that give the global batch ``before`` on ``dp`` data-parallel ranks: the largest
    micro-batch up to ``batch_size`` that divides each rank's share, or why there is none."""
    if before % dp:
        return (f"{dp} data-parallel ranks cannot share {before} samples; use a data-parallel size that divides "
                f"{before}")
    micro = max(b for b in range(1, min(batch_size, before // dp) + 1) if (before // dp) % b == 0)
    return f"set data.global_batch_size={before}" + (f" data.batch_size={micro}" if micro != batch_size else "")
