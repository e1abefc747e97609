"""Training checkpoints: ``output_dir/checkpoints/iter_NNNNNNN/`` written atomically, and the
``checkpoints/latest`` marker naming the newest complete one.

Inside a checkpoint:
- ``generator/`` and ``fake_score/`` (methods with one; not ADP): megatron-core distributed checkpoints of the weights
  (loadable at any TP / CP layout, convertible with ``tools/convert_checkpoint.py megatron-to-hf``);
- ``discriminator.pt``: the discriminator heads of methods that have them (replicated, written by
  rank 0);
- ``train_state/``: a megatron-core distributed checkpoint of everything else a run needs to go on
  exactly: each trained network's AdamW state (moments sharded like their parameters, so they
  reshard too) and learning-rate scheduler (which holds the network's update count), the generator
  EMA, the skipped-update counters, the discriminator monitor's recent accuracies and the iteration;
- ``trainer_state.json``: the iteration, the layout it was saved at and the run config (read
  without loading anything, by ``adm_megatron.train.resume``).

Nothing else is needed: every random draw comes from generators seeded by (seed, iteration,
phase), the prompt sampler is a pure function of the iteration, and the networks have no dropout,
so no RNG state is consumed between iterations.

The directory appears under its final name only once every rank has written its part; ``latest``
is replaced (atomically) only after that, so a save killed at any moment leaves the previous
checkpoint as the one a resume loads. ``train.keep_checkpoints`` then removes the oldest ones.
Each rank's part is written by a process of its own (:func:`start_training_checkpoint`,
``adm_megatron.train.background_save``): a synchronous save (:func:`save_training_checkpoint`)
waits for it at once; with ``train.async_save`` training goes on meanwhile, and the directory is
published, and ``latest`` moves, once every rank's process has finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch.distributed.checkpoint.api import CheckpointException

from adm_megatron.config import ConfigError, config_to_dict
from adm_megatron.convert.checkpoint import (
    CheckpointError,
    load_failure,
    load_megatron_checkpoint_into,
    make_temporary_dir,
    megatron_checkpoint_contents,
    one_line,
    publish_temporary_dir,
    raise_interruption,
    write_checkpoint_meta,
)
from adm_megatron.mcore_compat import async_save_kwargs
from adm_megatron.parallel import barrier, from_rank0
from adm_megatron.train.background_save import BackgroundCheckpoint, BackgroundSaves
from adm_megatron.train.checkpoint_hold import READERS, free_to_remove
from adm_megatron.train.save_workers import bind_writer_processes

logger = logging.getLogger("adm_megatron")

LATEST = "latest"
STATE_FILE = "trainer_state.json"
ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_dir(output_dir: str, iteration: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"iter_{iteration:07d}")


def latest_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``checkpoints/latest`` names, or None when there is no marker."""
    marker = os.path.join(checkpoints_root(output_dir), LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    return os.path.join(checkpoints_root(output_dir), name)


def pruned_hint(path: str) -> str:
    """For a ``path`` that is not there: when it is (or is in) an ``iter_NNNNNNN`` of a run's
    ``checkpoints/``, what to add -- its run may have removed it (``train.keep_checkpoints``: a live
    run's checkpoint named a moment ago) and which checkpoint is the latest now; else ''."""
    ckpt = os.path.abspath(path)
    while ckpt != os.path.dirname(ckpt) and not ITERATION_DIR.match(os.path.basename(ckpt)):
        ckpt = os.path.dirname(ckpt)
    root = os.path.dirname(ckpt)
    if os.path.isdir(ckpt) or not os.path.isfile(os.path.join(root, LATEST)):
        return ""
    latest = latest_checkpoint(os.path.dirname(root))
    return (f" ({root} holds no {os.path.basename(ckpt)}: train.keep_checkpoints removes old ones; the latest is "
            f"now {latest}, or give the run directory {os.path.dirname(root)} for its latest)")


def checkpoint_from(path: str, what: str) -> str:
    """A training checkpoint directory from ``path``: a checkpoint, or a run directory (its
    ``checkpoints/latest``, which may be given itself); a one-line ConfigError naming ``what`` (the key
    or flag) otherwise."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    run = path
    if os.path.basename(os.path.normpath(path)) == LATEST and os.path.isfile(path):  # the marker: its run's latest
        run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    latest = latest_checkpoint(run)
    if latest is not None:
        return latest
    gone = pruned_hint(path)
    if gone:
        raise ConfigError(f"{what}={path!r}: no such checkpoint{gone}")
    raise ConfigError(
        f"{what}={path!r}: neither a checkpoint (no {STATE_FILE}) nor a run directory with "
        "checkpoints/latest"
    )


def _is_checkpoints(path: str) -> bool:
    """``path`` is a training checkpoint or a run's ``checkpoints/``."""
    return os.path.isfile(os.path.join(path, STATE_FILE)) or (
        os.path.basename(path) == "checkpoints" and os.path.isfile(os.path.join(path, LATEST)))


RUN_OUTPUTS = ("generator", "generator_lora", "samples")  # what a run writes into its output_dir besides checkpoints


def check_outside_runs(out: str, flag: str) -> None:
    """One-line ConfigError when the output ``out`` would lie inside what a training run owns (links
    followed): a training checkpoint or a run's ``checkpoints/``, which the run removes (``train.keep_checkpoints``
    prunes whole checkpoints, a restart removes ``*.tmp-*`` leftovers); a run's own exports and samples
    (``RUN_OUTPUTS``), which the run writes or replaces at its end (and the run's own outputs would be
    gone); or when ``out`` is a checkpoint, or a run's directory, which ``--overwrite`` would remove,
    a live run's included."""
    here = os.path.realpath(out)
    if _is_checkpoints(here) or _is_checkpoints(os.path.join(here, "checkpoints")):
        raise ConfigError(f"{flag} {out}: holds a training run's checkpoints, which writing there would remove; "
                          "choose another output")
    while True:
        parent = os.path.dirname(here)
        if parent == here:
            return
        if _is_checkpoints(parent):
            raise ConfigError(f"{flag} {out}: inside {parent}, whose run removes what is there (pruning old "
                              "checkpoints, clearing leftovers at a restart); choose an output outside checkpoints/")
        if os.path.basename(here) in RUN_OUTPUTS and _is_checkpoints(os.path.join(parent, "checkpoints")):
            raise ConfigError(f"{flag} {out}: the run {parent} writes its own {os.path.basename(here)}/ there (its "
                              "export or samples, replaced at its end); choose an output outside the run's")
        here = parent


# what the readers of a trainer_state.json (a resume, an export) take from it, by dotted key: a parent
# before its keys
_STATE_VALUES = (
    ("iteration", lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    ("config", lambda v: isinstance(v, dict), "an object (the run config)"),
    ("config.data", lambda v: isinstance(v, dict), "an object"),
    ("config.data.batch_size", lambda v: type(v) is int and v > 0, "a positive integer"),
    ("layout", lambda v: isinstance(v, dict), "an object (the parallel layout it was saved at)"),
    ("layout.data_parallel", lambda v: type(v) is int and v > 0, "a positive integer"),
)


def read_training_state(ckpt_dir: str) -> dict:
    """``trainer_state.json`` of a checkpoint (iteration, layout, run config); one-line ConfigErrors
    naming the file when it is not JSON or lacks a value its readers take (``_STATE_VALUES``)."""
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{ckpt_dir}: checkpoint has no {STATE_FILE} (incomplete, or not a training checkpoint)")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, valid, what in _STATE_VALUES:
        *parents, name = key.split(".")
        section = state
        for parent in parents:
            section = section[parent]
        if name not in section:
            raise ConfigError(f"{path}: {key} is missing (expected {what})")
        if not valid(section[name]):
            raise ConfigError(f"{path}: {key}={json.dumps(section[name])}: expected {what}")
    return state


def _network_sharded(trainer, name: str) -> dict:
    """The ``ShardedTensor``s of trained network ``name``, keyed uniquely for it."""
    if name == "discriminator":  # plain modules, replicated on every rank
        return make_sharded_tensors_for_checkpoint(trainer.heads.state_dict(keep_vars=True), "discriminator.")
    return getattr(trainer, name).sharded_state_dict(prefix=f"{name}.")


def _train_state(trainer, iteration: int) -> dict:
    """The sharded state dict of ``train_state/`` (for saving, and as the template to load into)."""
    models = {name: _network_sharded(trainer, name) for name in trainer.trainable}
    state = {name: net.optimizer.sharded_state_dict(models[name]) for name, net in trainer.trainable.items()}
    if trainer.ema is not None:
        state["ema"] = trainer.ema.sharded_state_dict(models["generator"], "generator.")
    state["phases"] = trainer.phases.state_dict()
    state["monitor"] = trainer.monitor.state_dict()
    state["iteration"] = iteration
    return state


def _layout(trainer) -> dict:
    return {
        "data_parallel": trainer.info.dp_size,
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "context_parallel": parallel_state.get_context_parallel_world_size(),
    }


class CheckpointContents(NamedTuple):
    """One checkpoint's contents, gathered on this rank."""

    target: str  # the checkpoint directory
    sharded: dict[str, dict]  # sub-directory -> its megatron-core sharded state dict
    write_small: Callable[[str], None]  # the small files, into a directory (rank 0 calls it)


def _contents(trainer, iteration: int) -> CheckpointContents:
    """Every rank gathers its own part of the checkpoint after ``iteration``; nothing is written yet."""
    bind_writer_processes()
    trainer.offload.restore_weights()
    trainer.offload.settle()  # offloaded optimizer states are written from their host buffers
    sharded, metas = {}, {}
    for name in ("generator", "fake_score"):  # ADP has no fake score
        if getattr(trainer, name) is not None:
            sharded[name], metas[name] = megatron_checkpoint_contents(getattr(trainer, name), trainer.arch)
    sharded["train_state"] = _train_state(trainer, iteration)
    parts = [*sharded, *(["discriminator.pt"] if trainer.heads is not None else [])]
    state = {"iteration": iteration, "layout": _layout(trainer), "config": config_to_dict(trainer.config),
             "parts": parts,  # what a whole checkpoint holds (train/checkpoint_files.py checks it)
             # a resume refuses data and frozen inputs changed since (train/input_identity.py)
             "data": trainer.data_identity, "weights": trainer.weights_identity}

    def write_small(directory: str) -> None:  # rank 0
        for name, meta in metas.items():
            write_checkpoint_meta(os.path.join(directory, name), meta)
        if trainer.heads is not None:
            torch.save(trainer.heads.state_dict(), os.path.join(directory, "discriminator.pt"))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        open(os.path.join(directory, READERS), "w").close()  # what readers lock (train/checkpoint_hold.py)

    return CheckpointContents(checkpoint_dir(trainer.config.output_dir, iteration), sharded, write_small)


def _on_rank0(target: str, tmp: str, what: str, write: Callable[[], None]) -> None:
    """Collective: ``write`` on rank 0 (the others wait for it); an ``OSError`` there (a full quota,
    say) ends the save on every rank in one line, with ``tmp`` removed, instead of leaving the
    other ranks waiting for rank 0 in the save's next collective until ``parallel.timeout_s``."""
    problem = None
    if dist.get_rank() == 0:
        try:
            write()
        except OSError as exc:
            problem = f"{target}: writing {what} failed ({one_line(exc)}); the previous checkpoint stays the latest"
    problem = from_rank0(problem)
    if problem is not None:
        publish_temporary_dir(tmp, target, CheckpointError(problem))  # removes tmp, raises on every rank


def _make_parts(target: str, tmp: str, contents: CheckpointContents) -> None:
    """Collective: the sub-directories megatron writes into (it wants them to exist)."""
    def make() -> None:
        for name in contents.sharded:
            os.mkdir(os.path.join(tmp, name))

    _on_rank0(target, tmp, "its directories", make)


def save_training_checkpoint(trainer, iteration: int) -> str:
    """Collective: the complete training state after ``iteration`` iterations, written before it
    returns; then the ``latest`` marker and the pruning of old checkpoints. Returns the checkpoint
    directory. It is :func:`start_training_checkpoint` waited for at once, so a failed or stuck
    write ends the same way as a background one: in one line, within ``parallel.timeout_s``
    (megatron-core's own synchronous save waits for its worker processes without a limit, and one
    killed by the OOM killer left the run hanging for good)."""
    saves = BackgroundSaves(trainer.config.parallel.timeout_s)
    saves.start(start_training_checkpoint(trainer, iteration))
    return saves.wait()


def _save_strategy() -> FullyParallelSaveStrategyWrapper:
    """megatron-core's torch_dist strategy, with the tensors that data-parallel (and context-parallel)
    ranks hold alike split among them for writing, as Megatron-LM's ``--ckpt-fully-parallel-save``
    (its default): without it data-parallel rank 0 alone writes, and stages in host memory, every
    replicated weight and optimizer moment while the other ranks write nothing."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                            parallel_state.get_data_parallel_group(with_context_parallel=True))


def bytes_on_disk(path: str) -> int:
    """The bytes of the files under ``path`` (a checkpoint's size)."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _check_room(output_dir: str) -> None:
    """Collective: a one-line ``CheckpointError`` on every rank when the checkpoints' filesystem has
    less room than the latest checkpoint took (old ones are pruned only after the new one is
    published). A save that runs out of space fails inside megatron-core on the rank that hit it
    alone, and the others wait for it until ``parallel.timeout_s``; this finds it before."""
    problem = None
    latest = latest_checkpoint(output_dir) if dist.get_rank() == 0 else None
    if latest is not None:
        need, free = bytes_on_disk(latest), shutil.disk_usage(checkpoints_root(output_dir)).free
        if free < need:
            problem = (f"{checkpoints_root(output_dir)}: {_size(free)} free, less than the "
                       f"{_size(need)} {os.path.basename(latest)} took; nothing was written and "
                       f"{os.path.basename(latest)} stays the latest (free space, or keep fewer with "
                       "train.keep_checkpoints)")
    problem = from_rank0(problem)
    if problem is not None:
        raise CheckpointError(problem)


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB under one (a small run's checkpoint read 0.00 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def start_training_checkpoint(trainer, iteration: int) -> BackgroundCheckpoint:
    """Collective: the complete training state after ``iteration`` iterations, planned for a
    process of its own to write (``BackgroundSaves.start`` stages it on the host and forks it)
    while training goes on. Until every rank's part is written the checkpoint stays a temporary
    directory and ``latest`` does not move."""
    began = time.monotonic()
    _check_room(trainer.config.output_dir)
    contents = _contents(trainer, iteration)
    target, tmp = make_temporary_dir(contents.target, True)
    _make_parts(target, tmp, contents)
    requests = [dist_checkpointing.save(sharded, os.path.join(tmp, name), _save_strategy(), async_sharded_save=True,
                                       **async_save_kwargs())
                for name, sharded in contents.sharded.items()]
    _on_rank0(target, tmp, "its small files", lambda: contents.write_small(tmp))

    def publish(failure: BaseException | None) -> str:
        path = publish_temporary_dir(tmp, target, failure)
        _after_publication(trainer.config, path)
        return path

    return BackgroundCheckpoint(target, requests, publish, began)


def _after_publication(config, path: str) -> None:
    """Collective: ``latest`` names the checkpoint just published; old ones go."""
    if dist.get_rank() == 0:
        write_latest_marker(config.output_dir, os.path.basename(path))
        _prune(config.output_dir, config.train.keep_checkpoints, keep=os.path.basename(path))
    barrier()


def write_latest_marker(output_dir: str, name: str) -> None:
    """``checkpoints/latest`` names ``name`` (written whole, then renamed over the old marker)."""
    marker = os.path.join(checkpoints_root(output_dir), LATEST)
    tmp = f"{marker}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def _prune(output_dir: str, keep_last: int, keep: str) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (never ``keep``); 0 keeps all. Each is
    renamed out of the ``iter_*`` namespace first, so a removal cut short never looks complete. One
    that a reader holds (an export, another run's resume: ``train/checkpoint_hold.py``) stays until
    a later save's pruning finds it free."""
    if keep_last <= 0:
        return
    root = checkpoints_root(output_dir)
    names = sorted(n for n in os.listdir(root) if ITERATION_DIR.match(n))
    for name in names[:-keep_last]:
        if name == keep:
            continue
        trash = os.path.join(root, f"{name}.removing-{uuid.uuid4().hex[:12]}")
        with free_to_remove(os.path.join(root, name)) as free:
            if not free:
                logger.info("%s: kept for now, a reader holds it (an export or a resume); a later save removes it",
                            os.path.join(root, name))
                continue
            os.rename(os.path.join(root, name), trash)
        shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(output_dir: str) -> list[str]:
    """Rank 0, before a run goes on: temporary and half-removed directories that a killed save
    or pruning left in ``checkpoints/`` (never a complete checkpoint). Returns what was removed."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        if ".tmp-" in name or ".removing-" in name or ".old-" in name:
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed


def load_training_checkpoint(trainer, ckpt_dir: str) -> int:
    """Collective: restore everything ``save_training_checkpoint`` wrote, at the current layout
    (weights and optimizer moments reshard). Returns the iteration the run goes on from."""
    load_megatron_checkpoint_into(trainer.generator, os.path.join(ckpt_dir, "generator"))
    if trainer.fake_score is not None:
        load_megatron_checkpoint_into(trainer.fake_score, os.path.join(ckpt_dir, "fake_score"))
    if trainer.heads is not None:
        heads = torch.load(os.path.join(ckpt_dir, "discriminator.pt"), map_location=trainer.device,
                           weights_only=True)
        trainer.heads.load_state_dict(heads)
    template = _train_state(trainer, 0)
    try:
        with warnings.catch_warnings():  # megatron-core 0.16 still calls DCP's deprecated load_state_dict
            warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
            loaded = dist_checkpointing.load(template, os.path.join(ckpt_dir, "train_state"))
    except CheckpointException as exc:  # torch DCP's (a BaseException): every rank's failure in it
        raise_interruption(exc)
        raise load_failure(exc, os.path.join(ckpt_dir, "train_state")) from exc
    for name, net in trainer.trainable.items():
        net.optimizer.load_sharded_state_dict(loaded[name])
    if trainer.ema is not None:
        trainer.ema.load_sharded_state_dict(loaded["ema"])
    trainer.phases.load_state_dict(loaded["phases"])
    trainer.monitor.load_state_dict(loaded["monitor"])
    return int(loaded["iteration"])
