"""megatron-core distributed checkpoints of the megatron backbones (any registered model family,
``adm_megatron.families``), and conversion to and from diffusers directories.

A checkpoint directory holds megatron-core's ``dist_checkpointing`` output (torch_dist backend:
``*.distcp`` shards, ``.metadata``, ``metadata.json`` and, written by megatron-core up to 0.18,
``common.pt``: see ``adm_megatron.mcore_compat``) plus
``adm_megatron_checkpoint.json``: the format version, the model family (``model``), the
diffusers architecture config and, for a LoRA generator, its adapters' settings (``lora``), from which :func:`load_megatron_checkpoint` rebuilds the model for
whatever tensor / context parallel layout is in force when it loads (tensors are stored
whole-shaped, so any layout can read them).

Collective functions (call them on every rank): :func:`save_megatron_checkpoint`,
:func:`load_megatron_checkpoint`, :func:`load_megatron_checkpoint_into`,
:func:`hf_to_megatron_checkpoint`, :func:`megatron_to_hf_checkpoint`.

Outputs are never left half written: everything goes to ``<out>.tmp-<id>`` and is renamed to
``<out>`` by rank 0 once every rank has finished; on a failure the temporary directory is removed.
An existing non-empty ``<out>`` is only replaced with ``overwrite=True``.

The sharded state dict is the model's own (its ``sharded_state_dict`` asks each block for its
shards: megatron's default would mark the ``ModuleList`` of blocks replicated and save only rank
0's tensor-parallel shards without complaint). :func:`sharded_state_dict`
checks the result against the parameters' ``tensor_model_parallel`` / ``partition_dim`` tags
before anything is written, so such a silent loss cannot recur.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import uuid
import warnings
import zipfile
import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from adm_megatron.config import LoraConfig
from adm_megatron.convert.distillation_record import write_distillation_record
from adm_megatron.file_modes import give_umask_modes
from adm_megatron.lora.adapters import apply_lora, lora_adapters
from adm_megatron.lora.merge import merged_full_state_dict
from adm_megatron.mcore_compat import COMMON_STATE_FILE, common_state_in_file
from adm_megatron.parallel import barrier, from_rank0
from adm_megatron.versions import installed_version

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_META_FILE",
    "CheckpointError",
    "CheckpointNotFoundError",
    "OutputNotEmptyError",
    "check_output_dir",
    "check_shard_files",
    "export_diffusers",
    "export_full_state_dict",
    "hf_to_megatron_checkpoint",
    "is_megatron_checkpoint",
    "load_megatron_checkpoint",
    "load_megatron_checkpoint_into",
    "make_temporary_dir",
    "megatron_checkpoint_contents",
    "one_line",
    "publish_temporary_dir",
    "megatron_to_hf_checkpoint",
    "read_checkpoint_arch",
    "read_checkpoint_family",
    "read_checkpoint_meta",
    "save_megatron_checkpoint",
    "sharded_state_dict",
    "verify_checkpoint",
    "write_atomically",
    "write_checkpoint_meta",
]

CHECKPOINT_FORMAT = "adm_megatron.megatron_checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_META_FILE = "adm_megatron_checkpoint.json"
_MCORE_CONFIG = "metadata.json"  # written last by megatron's dist_checkpointing.save
_DCP_METADATA = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message is one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint (or diffusers) directory or one of its files does not exist."""


class OutputNotEmptyError(CheckpointError):
    """An output directory that exists and is not empty, written without ``overwrite``: the message
    names the Python argument; a command names its own flag with :meth:`naming`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        super().__init__(self.naming("overwrite=True"))

    def naming(self, switch: str) -> str:
        """The message with ``switch`` (``--overwrite``) as what replaces the directory."""
        return f"output directory {self.out_dir} exists and is not empty (pass {switch} to replace it)"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# rank helpers (all work without a process group too: a plain process is a world of one)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _all_true(flag: bool) -> bool:
    if not _dist() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# --------------------------------------------------------------------------------------------
# atomic output directories


def output_holds(out_dir: str, source: str) -> str | None:
    """How the directory ``out_dir`` sits against an input ``source`` it may not be written over
    (paths resolved, links followed): 'is' or 'contains' (replacing it would delete the input), 'lies
    inside' (writing it, or replacing it with --overwrite, would change the input: a pipeline's
    transformer/ or vae/ given as the output), else None."""
    out, src = os.path.realpath(out_dir), os.path.realpath(source)
    if src == out:
        return "is"
    if src.startswith(out.rstrip(os.sep) + os.sep):
        return "contains"
    return "lies inside" if out.startswith(src.rstrip(os.sep) + os.sep) else None


def check_output_dir(out_dir: str, overwrite: bool = False, source: str | None = None) -> None:
    """One-line CheckpointError if ``out_dir`` may not be written (exists, non-empty, and
    ``overwrite`` is False; or is a file; or is, contains or lies inside the ``source`` it is written
    from, which writing it would delete or change). Local check, no collectives."""
    if os.path.isfile(out_dir):
        raise CheckpointError(f"output {out_dir} exists and is a file")
    relation = source is not None and output_holds(out_dir, source)
    if relation:
        raise CheckpointError(f"output {out_dir} {relation} the input {source}: writing it would "
                              f"{'change' if relation == 'lies inside' else 'delete'} what it is written from; "
                              "choose another output")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OutputNotEmptyError(out_dir)


def make_temporary_dir(out_dir: str, overwrite: bool) -> tuple[str, str]:
    """Collective: check that ``out_dir`` may be written, then create the shared temporary
    directory its contents are written into. Returns (absolute ``out_dir``, temporary dir)."""
    out_dir = os.path.abspath(out_dir)
    error = None
    if _rank() == 0:
        try:
            check_output_dir(out_dir, overwrite)
        except CheckpointError as exc:
            error = str(exc)
    error = from_rank0(error)
    if error:
        raise CheckpointError(error)

    tmp = from_rank0(f"{out_dir}.tmp-{uuid.uuid4().hex[:12]}")
    made = None
    if _rank() == 0:
        try:
            os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
            os.mkdir(tmp)
        except OSError as exc:
            made = f"cannot create {tmp}: {one_line(exc)}"
    made = from_rank0(made)
    if made:
        raise CheckpointError(made)
    return out_dir, tmp


def publish_temporary_dir(tmp: str, out_dir: str, failure: BaseException | None = None) -> str:
    """Collective: once every rank has written its part of ``tmp`` (``failure`` None on each),
    rank 0 renames it to ``out_dir``. On any rank's failure ``tmp`` is removed and every rank
    raises (the failing rank its own exception)."""
    ok = _all_true(failure is None)
    if ok and _rank() == 0:
        try:
            give_umask_modes(tmp)  # safetensors writes owner-only files
            _replace_dir(tmp, out_dir)
        except OSError as exc:
            failure = CheckpointError(f"cannot move {tmp} to {out_dir}: {one_line(exc)}")
        ok = failure is None
    ok = from_rank0(ok)
    if not ok:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if failure is not None:
            raise failure
        raise CheckpointError(f"writing {out_dir} failed on another rank; nothing was written")
    barrier()
    return out_dir


def write_atomically(out_dir: str, overwrite: bool, write: Callable[[str], None]) -> str:
    """Collective: ``write(tmp)`` on every rank into a shared temporary directory, then rank 0
    renames it to ``out_dir`` (:func:`make_temporary_dir`, :func:`publish_temporary_dir`)."""
    out_dir, tmp = make_temporary_dir(out_dir, overwrite)
    failure: BaseException | None = None
    try:
        write(tmp)
    except BaseException as exc:  # noqa: BLE001 - cleaned up and re-raised by the publication
        failure = exc
    return publish_temporary_dir(tmp, out_dir, failure)


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted after."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = f"{out_dir}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the previous checkpoint back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # replaces an empty directory atomically


# --------------------------------------------------------------------------------------------
# the sharded state dict


def sharded_state_dict(model: torch.nn.Module) -> dict:
    """``{state-dict key: ShardedTensor / ShardedObject}`` for ``model`` at the current layout,
    keyed like ``model.state_dict()``; every tensor-parallel parameter is checked to be sharded
    ``tp`` ways along its ``partition_dim`` (see the module docstring for why)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    sd = model.sharded_state_dict()

    expected = model.state_dict(keep_vars=True)
    if set(sd) != set(expected):
        diff = sorted(set(sd) ^ set(expected))
        raise CheckpointError(f"sharded state dict and state_dict disagree on key {diff[0]!r}")
    for key, value in expected.items():
        if not isinstance(value, torch.Tensor):
            continue
        sh = sd[key]
        if not isinstance(sh, ShardedTensor):
            raise CheckpointError(f"tensor {key!r} is not a ShardedTensor in the sharded state dict")
        if tp_size > 1 and getattr(value, "tensor_model_parallel", False):
            dim = int(value.partition_dim)
            if sh.axis_fragmentations[dim] != tp_size:
                raise CheckpointError(
                    f"tensor {key!r} is tensor-parallel along dim {dim} but its sharded state dict "
                    f"entry is split {sh.axis_fragmentations[dim]} ways, not {tp_size}"
                )
    return sd


# --------------------------------------------------------------------------------------------
# metadata


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size() if _dist() else 1,
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "context_parallel": parallel_state.get_context_parallel_world_size(),
    }


def read_checkpoint_meta(ckpt_dir: str) -> dict[str, Any]:
    """The ``adm_megatron_checkpoint.json`` of a checkpoint, validated; one-line errors for a
    missing directory, a missing / unreadable / foreign / newer JSON, or missing megatron files."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    path = os.path.join(ckpt_dir, CHECKPOINT_META_FILE)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f"{ckpt_dir}: no {CHECKPOINT_META_FILE} (not an adm_megatron megatron checkpoint, or an "
            "incomplete one)"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format is not {CHECKPOINT_FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (this code reads up to "
            f"{CHECKPOINT_FORMAT_VERSION})"
        )
    from adm_megatron.families import family_names

    if meta.get("model") not in family_names():
        raise CheckpointError(f"{path}: model {meta.get('model')!r} is not one of {family_names()}")
    if not isinstance(meta.get("diffusers_config"), dict):
        raise CheckpointError(f"{path}: diffusers_config is missing")
    for name in (_MCORE_CONFIG, _DCP_METADATA):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointNotFoundError(f"{ckpt_dir}: megatron checkpoint file {name} is missing")
    from adm_megatron.mcore_compat import unreadable_layout

    problem = unreadable_layout(ckpt_dir)
    if problem is not None:
        raise CheckpointError(problem)
    return meta


def verify_checkpoint(ckpt_dir: str) -> dict[str, Any]:
    """Checks that need no model (and no process group): :func:`read_checkpoint_meta`, megatron-core's
    own files there and whole (:func:`check_megatron_files`), every shard file present and long
    enough. Returns the JSON."""
    meta = read_checkpoint_meta(ckpt_dir)
    check_megatron_files(ckpt_dir)
    check_shard_files(ckpt_dir)
    return meta


MCORE_FILES = (".metadata", "metadata.json")  # what megatron-core's save writes besides the shards


def zip_damage(path: str) -> str | None:
    """What is wrong with a ``torch.save`` zip archive (unreadable, a member failing its CRC), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{path}: unreadable ({' '.join(str(err).split())})"
    return None if bad is None else f"{path}: {bad} fails its CRC check"


def check_megatron_files(ckpt_dir: str) -> None:
    """megatron-core's files of a distributed checkpoint: ``.metadata``, ``metadata.json`` and, where
    it keeps its common state there (up to 0.18), ``common.pt`` with its CRCs whole; one-line
    CheckpointError (a missing ``common.pt`` ended the load in an AttributeError)."""
    common_file = common_state_in_file(ckpt_dir)
    for name in MCORE_FILES + ((COMMON_STATE_FILE,) if common_file else ()):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
    problem = zip_damage(os.path.join(ckpt_dir, COMMON_STATE_FILE)) if common_file else None
    if problem:
        raise CheckpointError(problem)


def _family_from_meta(meta: dict[str, Any], ckpt_dir: str):
    """(model family, architecture) recorded in a validated checkpoint JSON."""
    from adm_megatron.families import get_family

    family = get_family(meta["model"])
    try:
        return family, family.arch_from_diffusers_config(
            meta["diffusers_config"], os.path.join(ckpt_dir, CHECKPOINT_META_FILE)
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(one_line(exc)) from None


# --------------------------------------------------------------------------------------------
# save / load


def megatron_checkpoint_contents(model, arch=None) -> tuple[dict, dict[str, Any]]:
    """What :func:`save_megatron_checkpoint` writes for ``model`` (``arch`` defaults to
    ``model.arch``): its sharded state dict and the checkpoint JSON (:func:`write_checkpoint_meta`)."""
    from adm_megatron.families import family_of_arch

    arch = arch if arch is not None else model.arch
    family = family_of_arch(arch)
    adapters = lora_adapters(model)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": family.name,
        "diffusers_config": family.arch_to_diffusers_config(arch),
        "params_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "saved_layout": _layout(),
        "megatron_core": installed_version("megatron-core"),
        "torch": torch.__version__,
    }
    if adapters is not None:  # a LoRA generator: loading rebuilds the same adapters (see _build)
        meta["lora"] = dataclasses.asdict(adapters.config)
    return sharded_state_dict(model), meta


def write_checkpoint_meta(ckpt_dir: str, meta: dict[str, Any]) -> None:
    """Rank 0: the checkpoint JSON next to megatron's files."""
    if _rank() == 0:
        with open(os.path.join(ckpt_dir, CHECKPOINT_META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")


def save_megatron_checkpoint(model, out_dir: str, arch=None, *, overwrite: bool = False) -> str:
    """Collective: write ``model`` (at any TP / CP / DP layout) as a megatron-core distributed
    checkpoint in ``out_dir`` plus the architecture JSON (``arch`` defaults to ``model.arch``).
    Returns the absolute ``out_dir``."""
    from megatron.core import dist_checkpointing

    sd, meta = megatron_checkpoint_contents(model, arch)

    def write(tmp: str) -> None:
        dist_checkpointing.save(sd, tmp)
        write_checkpoint_meta(tmp, meta)

    return write_atomically(out_dir, overwrite, write)


def _read_dcp_metadata(ckpt_dir: str):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(ckpt_dir).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unpickling / IO error of a damaged file
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, _DCP_METADATA)}: unreadable checkpoint metadata "
            f"({type(exc).__name__}: {one_line(exc, 150)})"
        ) from None


def _precheck(sd: dict, ckpt_dir: str) -> None:
    """Compare what the model needs with what the checkpoint holds, before megatron reads any
    tensor: every tensor present with the same global shape, every shard file there and long
    enough, megatron-core's own files there and whole. One-line CheckpointError naming the tensor (and
    the shapes / file)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_megatron_files(ckpt_dir)
    metadata = _read_dcp_metadata(ckpt_dir)
    stored = metadata.state_dict_metadata
    for key, sh in sd.items():
        if not isinstance(sh, ShardedTensor):
            continue
        entry = stored.get(sh.key)
        if entry is None:
            raise CheckpointError(
                f"{ckpt_dir}: tensor {sh.key!r} is missing from the checkpoint (the model expects "
                f"shape {tuple(sh.global_shape)})"
            )
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt_dir}: {sh.key!r} is stored as an object, not a tensor")
        if tuple(entry.size) != tuple(sh.global_shape):
            raise CheckpointError(
                f"{ckpt_dir}: tensor {sh.key!r} has shape {tuple(entry.size)} in the checkpoint, "
                f"the model expects {tuple(sh.global_shape)} (a different architecture?)"
            )
    wanted = {sh.key for sh in sd.values() if isinstance(sh, ShardedTensor)}
    extra = sorted(k for k, v in stored.items() if isinstance(v, TensorStorageMetadata) and k not in wanted)
    if extra:
        raise CheckpointError(
            f"{ckpt_dir}: the checkpoint has tensor {extra[0]!r} that the model does not "
            f"({len(extra)} in all; a different architecture?)"
        )
    check_shard_files(ckpt_dir, metadata)


def check_shard_files(ckpt_dir: str, metadata=None) -> None:
    """Every shard file the checkpoint's DCP metadata (read here when not given) points to exists and
    holds the bytes it should: one-line CheckpointError naming the file and a tensor it holds."""
    metadata = _read_dcp_metadata(ckpt_dir) if metadata is None else metadata
    stored = metadata.state_dict_metadata
    for name, items in _items_by_file(metadata):
        path = os.path.join(ckpt_dir, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None:
            bad = items
        else:
            bad = [(index, info) for index, info in items if size < info.offset + info.length]
        if not bad:
            continue
        info, what = _first_item(stored, bad)
        if size is None:
            raise CheckpointError(f"{ckpt_dir}: shard file {name} is missing; it holds {what}")
        raise CheckpointError(
            f"{ckpt_dir}: shard file {name} is truncated ({size} bytes, needs "
            f"{info.offset + info.length} for {what})"
        )


def _items_by_file(metadata) -> list[tuple[str, list]]:
    """The checkpoint's stored items, (storage index, storage info) pairs, by shard file name."""
    by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        by_file.setdefault(str(info.relative_path), []).append((index, info))
    return sorted(by_file.items())


def _first_item(stored: dict, items: list) -> tuple[Any, str]:
    """The storage info of the first of ``items`` -- a tensor (not a sharded object) where there is
    one -- and what they are for a message: ``tensor 'x' (chunk at offset ...) and N more``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = [item for item in items if isinstance(stored.get(item[0].fqn), TensorStorageMetadata)]
    index, info = (tensors or items)[0]
    what = f"tensor {index.fqn!r}" if tensors else f"object {index.fqn!r}"
    if index.offset:
        what += f" (chunk at offset {tuple(index.offset)})"
    return info, what + (f" and {len(items) - 1} more" if len(items) > 1 else "")


def _damaged_shard_file(ckpt_dir: str) -> str | None:
    """A one-line message naming the first shard file with a stored item whose bytes are damaged in
    place (the file has its full length, so :func:`check_shard_files` passes it), or None. Each item
    is a ``torch.save`` zip archive whose members carry a CRC-32: checked without unpickling anything.
    Reads every item: for a load that failed only."""
    metadata = _read_dcp_metadata(ckpt_dir)
    stored = metadata.state_dict_metadata
    for name, items in _items_by_file(metadata):
        with open(os.path.join(ckpt_dir, name), "rb") as f:
            for index, info in items:
                if getattr(info, "transform_descriptors", None):  # stored transformed (e.g. compressed)
                    continue
                f.seek(info.offset)
                try:
                    with zipfile.ZipFile(io.BytesIO(f.read(info.length))) as archive:
                        damaged = archive.testzip() is not None  # the first member whose CRC differs
                except (zipfile.BadZipFile, EOFError, ValueError, zlib.error):
                    damaged = True
                if damaged:
                    what = _first_item(stored, [(index, info)])[1]
                    return (f"{ckpt_dir}: shard file {name} is damaged: the bytes of {what} in it do not check out, "
                            "though the file has its full length (bytes in it changed); copy the checkpoint again")
    return None


def raise_interruption(exc: BaseException) -> None:
    """Re-raise what interrupted a load rather than failed it: torch DCP gathers every rank's exception
    into a CheckpointException, a stop signal's (``StartupStop``) and Ctrl-C's ``KeyboardInterrupt``
    included, which would otherwise read as a damaged checkpoint (exit 1, not the stop's 75)."""
    failures = getattr(exc, "failures", None)
    for failure in (failures.values() if isinstance(failures, dict) else ()):
        failure = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(failure, BaseException) and not isinstance(failure, Exception):
            raise failure


def load_failure(exc: BaseException, ckpt_dir: str) -> CheckpointError:
    """The one-line error for a failed load of ``ckpt_dir`` (after :func:`raise_interruption`)."""
    return CheckpointError(f"{ckpt_dir}: loading failed ({_describe_load_failure(exc)})")


def _describe_load_failure(exc: BaseException) -> str:
    """One line for megatron's / torch DCP's load errors (a DCP CheckpointException carries one
    traceback per failing rank: name the first rank's exception)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = sorted(failures)[0]
        inner = failures[rank]
        inner = inner[0] if isinstance(inner, tuple) else inner
        return f"rank {rank}: {type(inner).__name__}: {one_line(inner, 200)}"
    return f"{type(exc).__name__}: {one_line(exc, 200)}"


def load_megatron_checkpoint_into(model, ckpt_dir: str) -> dict[str, Any]:
    """Collective: load the checkpoint into an already built ``model`` (any TP / CP layout);
    returns the checkpoint's metadata JSON. One-line CheckpointError on any mismatch."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_checkpoint_meta(ckpt_dir)
    sd = sharded_state_dict(model)
    _precheck(sd, ckpt_dir)
    try:
        with warnings.catch_warnings():
            # megatron-core 0.16 still calls torch DCP's deprecated load_state_dict
            warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
            loaded = dist_checkpointing.load(sd, ckpt_dir)
    # torch DCP's CheckpointException (a BaseException) gathers every rank's traceback
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        raise_interruption(exc)
        # torch's own error for a damaged shard (an UnpicklingError that suggests weights_only=False)
        # names no file: find it
        damaged = _damaged_shard_file(ckpt_dir)
        raise (CheckpointError(damaged) if damaged else load_failure(exc, ckpt_dir)) from exc
    try:
        model.load_state_dict(loaded, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt_dir}: {one_line(exc)}") from exc
    return meta


def load_megatron_checkpoint(ckpt_dir: str, *, arch=None, **build_kwargs):
    """Collective: build the model described by the checkpoint's JSON (or ``arch``) for the current
    parallel layout (a world of one if none is initialized) and load the checkpoint into it.
    ``build_kwargs`` go to the family's ``build_model`` (sequence_parallel, params_dtype...);
    ``params_dtype`` defaults to the dtype the checkpoint was saved in. A LoRA generator's
    checkpoint (its JSON has ``lora``) comes back with the same adapters."""
    from adm_megatron.families import family_of_arch

    meta = read_checkpoint_meta(ckpt_dir)
    if arch is None:
        arch = _family_from_meta(meta, ckpt_dir)[1]
    saved_dtype = getattr(torch, str(meta.get("params_dtype", "float32")), None)
    if isinstance(saved_dtype, torch.dtype):
        build_kwargs.setdefault("params_dtype", saved_dtype)
    model = family_of_arch(arch).build_model(arch, **build_kwargs)
    if meta.get("lora"):  # the adapters' own values come from the checkpoint, the seed is irrelevant
        apply_lora(model, LoraConfig(**meta["lora"]), seed=0)
    load_megatron_checkpoint_into(model, ckpt_dir)
    return model


# --------------------------------------------------------------------------------------------
# conversion


def transformer_dir_of(path: str) -> str:
    """``path``, or the transformer of the diffusers pipeline directory ``path`` (``transformer/``)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return os.path.join(path, "transformer")
    return path


def hf_to_megatron_checkpoint(hf_dir: str, out_dir: str, *, overwrite: bool = False, **build_kwargs) -> str:
    """Collective: diffusers transformer directory (of any registered family, by its
    ``_class_name``), or a pipeline directory with one in ``transformer/`` (as ``model.teacher``
    takes) -> megatron checkpoint, written at the current layout (a world of one if none is
    initialized). ``params_dtype`` None (or not given): the dtype of the diffusers weights, so that
    the round trip gives them back bit for bit (float32 when they mix)."""
    from adm_megatron.families import family_of_model_dir
    from adm_megatron.models.diffusers_files import weights_dtype

    if not os.path.isdir(hf_dir):
        raise CheckpointNotFoundError(f"diffusers model directory {hf_dir} does not exist")
    check_output_dir(os.path.abspath(out_dir), overwrite, source=hf_dir)
    hf_dir = transformer_dir_of(hf_dir)
    try:
        family = family_of_model_dir(hf_dir)
        if build_kwargs.get("params_dtype") is None:
            build_kwargs["params_dtype"] = weights_dtype(hf_dir)
    except ValueError as exc:
        raise CheckpointError(one_line(exc)) from None
    model = family.build_model_from_hf(hf_dir, **build_kwargs)
    return save_megatron_checkpoint(model, out_dir, model.arch, overwrite=overwrite)


def _diffusers_model(model_class: type, config: dict[str, Any], state: dict[str, torch.Tensor]):
    """A diffusers ``model_class`` with exactly ``state`` (built on the meta device, then assigned,
    so no random initialisation of a multi-billion-parameter model happens)."""
    name = f"diffusers {model_class.__name__}"
    with torch.device("meta"):
        model = model_class.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: {one_line(exc)}") from exc
    leftover = [n for n, t in model.state_dict().items() if t.is_meta]
    if leftover:
        raise CheckpointError(f"{name}: tensor {leftover[0]!r} not loaded")
    return model


def megatron_to_hf_checkpoint(ckpt_dir: str, out_dir: str, *, overwrite: bool = False, **build_kwargs) -> str:
    """Collective: megatron checkpoint -> diffusers directory (``save_pretrained`` output, loadable
    with the family's diffusers class ``from_pretrained``). Loads at the current layout, gathers
    the whole tensors, and rank 0 writes (see :func:`export_diffusers`). A LoRA generator's
    checkpoint is written with its adapters merged into the weights."""
    meta = read_checkpoint_meta(ckpt_dir)
    check_output_dir(os.path.abspath(out_dir), overwrite, source=ckpt_dir)
    arch = _family_from_meta(meta, ckpt_dir)[1]
    model = load_megatron_checkpoint(ckpt_dir, arch=arch, **build_kwargs)
    if lora_adapters(model) is not None:  # a LoRA run's generator: its weights with the adapters merged
        return export_full_state_dict(merged_full_state_dict(model), arch, out_dir, overwrite=overwrite)
    return export_diffusers(model, arch, out_dir, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# used by the trainer


def is_megatron_checkpoint(path: str) -> bool:
    """Whether ``path`` looks like a checkpoint written by ``save_megatron_checkpoint``."""
    return os.path.isfile(os.path.join(path, CHECKPOINT_META_FILE))


def read_checkpoint_family(ckpt_dir: str):
    """(model family, architecture) a checkpoint was saved with (validated JSON, one-line errors)."""
    return _family_from_meta(read_checkpoint_meta(ckpt_dir), ckpt_dir)


def read_checkpoint_arch(ckpt_dir: str):
    """The architecture a checkpoint was saved with (validated JSON, one-line errors)."""
    return read_checkpoint_family(ckpt_dir)[1]


def export_diffusers(model, arch, out_dir: str, *, overwrite: bool = False, record: dict | None = None) -> str:
    """Collective: a (possibly TP-sharded) megatron model as a diffusers directory of its family's
    transformer class; rank 0 writes it atomically (with ``record`` as its ``distillation.json``)."""
    from adm_megatron.models.weights import gather_full_state_dict

    return export_full_state_dict(gather_full_state_dict(model), arch, out_dir, overwrite=overwrite, record=record)


def export_full_state_dict(full: dict[str, torch.Tensor], arch, out_dir: str, *, overwrite: bool = False,
                           record: dict | None = None) -> str:
    """Collective: whole megatron-named tensors (e.g. a LoRA generator's merged weights) as a
    diffusers directory of the architecture's family; rank 0 writes it atomically, with ``record``
    (``adm_megatron.convert.distillation_record``) as its ``distillation.json`` when given."""
    from adm_megatron.families import family_of_arch

    family = family_of_arch(arch)
    config = family.arch_to_diffusers_config(arch)

    def write(tmp: str) -> None:
        if _rank() == 0:
            hf_state = family.megatron_to_hf(full, arch)
            _diffusers_model(family.diffusers_model_class(), config, hf_state).save_pretrained(tmp)
            if record is not None:
                write_distillation_record(tmp, record)

    return write_atomically(out_dir, overwrite, write)

