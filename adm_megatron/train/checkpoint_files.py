"""A training checkpoint's files checked against its own records before a resume or an export loads it.

A checkpoint is written atomically (``train/checkpoint.py``), yet its files can still be damaged
afterwards: a copy between filesystems cut short, a full quota during a staged restore, a node
lost before the filesystem flushed its data. Loading such a checkpoint ends deep inside torch's
reader (``EOFError``, a pickle error) or, on many ranks, in a hang until ``parallel.timeout_s``.
:func:`damage` finds that from small files only, before any process group or model exists
(``check_whole`` turns it into the one-line refusal of a resume or an export):

- ``trainer_state.json`` must parse and hold what a resume or an export takes from it
  (``read_training_state``), and every part it lists (``parts``: the networks' directories,
  ``train_state/``, ``discriminator.pt`` where the method has heads) must be there;
- the networks' megatron checkpoints (``generator/``, ``fake_score/``) pass the converter's own
  ``verify_checkpoint``, and ``train_state/`` the same shard check (``check_shard_files``): torch
  DCP's ``.metadata`` lists, for every tensor chunk, its file, offset and length, and every listed
  file must exist and reach the end of its last chunk (the shards carry no checksums, and reading
  them whole would cost as much as the load);
- the zip archives ``torch.save`` writes (``discriminator.pt``, each ``common.pt`` where
  megatron-core wrote one: up to 0.18, see ``adm_megatron.mcore_compat``): their CRCs are
  checked (they are small).

A checkpoint whose layout the installed megatron-core cannot read (written by a newer one) is
refused by :func:`check_whole` in one line of its own, not as damage.

:func:`hold_checkpoint_from` resolves a path given to a resume or an export to the checkpoint it
names, held against its run's pruning; a ``latest`` marker naming a checkpoint that is not there is
refused naming the newest whole one. :func:`read_part_tensors` reads one part's tensors back whole,
without a process group or a model (to compare two checkpoints).
"""

from __future__ import annotations

import os

from adm_megatron.config import ConfigError
from adm_megatron.convert.checkpoint import (
    CheckpointError,
    check_megatron_files,
    check_shard_files,
    verify_checkpoint,
    zip_damage,
)
from adm_megatron.mcore_compat import unreadable_layout
from adm_megatron.train.checkpoint import ITERATION_DIR, LATEST, checkpoint_from, read_training_state
from adm_megatron.train.checkpoint_hold import CheckpointGone, CheckpointHold


def _distributed_damage(directory: str, network: bool) -> str | None:
    if not os.path.isdir(directory):
        return f"{directory}: missing"
    try:
        if network:  # a network's megatron checkpoint: its JSON, megatron-core's files and the shards
            verify_checkpoint(directory)
        else:
            check_megatron_files(directory)
            check_shard_files(directory)
    except CheckpointError as err:
        return str(err)
    return None


def _parts(ckpt_dir: str) -> list[tuple[str, bool]]:
    """The checkpoint's megatron parts: (directory, whether it is a network's checkpoint)."""
    parts = [(os.path.join(ckpt_dir, "generator"), True), (os.path.join(ckpt_dir, "train_state"), False)]
    fake_score = os.path.join(ckpt_dir, "fake_score")
    if os.path.isdir(fake_score):  # ADP has no fake score
        parts.insert(1, (fake_score, True))
    return parts


def damage(ckpt_dir: str) -> str | None:
    """What is wrong with the checkpoint's files (one line), or None when they are whole."""
    try:
        recorded = read_training_state(ckpt_dir)
    except ConfigError as err:
        return str(err)
    for name in recorded.get("parts", ()):  # older checkpoints: none listed
        if not os.path.exists(os.path.join(ckpt_dir, name)):
            return f"{os.path.join(ckpt_dir, name)}: missing (the checkpoint lists it)"
    for directory, network in _parts(ckpt_dir):
        problem = _distributed_damage(directory, network)
        if problem:
            return problem
    heads = os.path.join(ckpt_dir, "discriminator.pt")
    return zip_damage(heads) if os.path.exists(heads) else None


def earlier_whole_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint beside ``ckpt_dir`` with a smaller iteration whose files are whole (any
    iteration when ``ckpt_dir`` is no ``iter_NNNNNNN``: a ``latest`` marker naming something else)."""
    root, name = os.path.split(ckpt_dir)  # name "": an empty latest marker
    if not os.path.isdir(root):
        return None
    match = ITERATION_DIR.match(name)
    below = int(match[1]) if match else float("inf")
    earlier = sorted((n for n in os.listdir(root) if (m := ITERATION_DIR.match(n)) and int(m[1]) < below),
                     reverse=True)
    for other in earlier:
        path = os.path.join(root, other)
        if damage(path) is None:
            return path
    return None


def check_whole(ckpt_dir: str, way_on: str) -> None:
    """One-line ConfigError for a checkpoint whose files are damaged: the file, and ``way_on``
    formatted with the newest whole checkpoint before it (when there is one). A checkpoint written
    by a newer megatron-core than the installed one can read is refused first, in a line of its own."""
    for directory, _network in _parts(ckpt_dir):
        problem = unreadable_layout(directory) if os.path.isdir(directory) else None
        if problem is not None:
            raise ConfigError(problem)
    problem = damage(ckpt_dir)
    if problem is not None:
        earlier = earlier_whole_checkpoint(ckpt_dir)
        then = way_on.format(earlier) if earlier else "no earlier whole checkpoint is left beside it"
        raise ConfigError(f"{ckpt_dir}: damaged checkpoint, nothing was loaded ({problem}); {then}")


def read_part_tensors(part_dir: str, scratch_file: str) -> dict:
    """Every tensor of a checkpoint part (a torch DCP directory: ``generator/``, ``train_state/``),
    whole, by dotted key; torch DCP converts it to one ``torch.save`` file, ``scratch_file``, first."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(part_dir, scratch_file)
    flat, stack = {}, [("", torch.load(scratch_file, weights_only=False))]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items())
        elif torch.is_tensor(node):
            flat[prefix] = node
    return flat


def hold_checkpoint_from(path: str, what: str) -> CheckpointHold:
    """:func:`checkpoint_from`, held against the pruning of the run that writes it
    (``adm_megatron.train.checkpoint_hold``) until the hold is released; a run directory whose
    latest was pruned before the hold took it is resolved again. A ``latest`` marker that still names
    a checkpoint that is not there (removed by hand, or the marker edited) is a one-line ConfigError
    naming the newest whole checkpoint beside it."""
    for attempt in range(3):
        ckpt = checkpoint_from(path, what)
        try:
            return CheckpointHold(ckpt)
        except CheckpointGone:
            if ckpt == path:
                raise
            if not os.path.isdir(ckpt) and checkpoint_from(path, what) == ckpt:  # a live run moves latest on
                raise _dangling_latest(path, what, ckpt) from None
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _dangling_latest(path: str, what: str, ckpt: str) -> ConfigError:
    """The refusal of ``path`` whose ``latest`` marker names ``ckpt``, which is not there."""
    marker = os.path.join(os.path.dirname(ckpt), LATEST)
    newest = earlier_whole_checkpoint(marker)  # of any iteration: the marker's own name is no iter_NNNNNNN
    way_on = (f"the newest whole checkpoint there is {newest}: give {what}={newest}" if newest
              else "no whole checkpoint is there")
    return ConfigError(f"{what}={path!r}: {marker} names {os.path.basename(ckpt)!r}, a checkpoint that is not there "
                       f"(removed, or the marker edited); {way_on}")
