"""Precomputed text embeddings: sharded safetensors on disk, a synthetic stand-in, a sampler.

The trainer never runs the text encoder: prompts are encoded once (``tools/
precompute_text_embeddings.py``) into a directory of

* ``shard-00000.safetensors`` ... -- key ``embeddings``, ``[rows, L, D]``, in prompt order, and
  for encoders with a pooled output (SD3's two CLIP projections) key ``pooled``, ``[rows, P]``;
* ``negative.safetensors`` -- key ``embeddings``, ``[L, D]`` (and ``pooled``, ``[P]``): the
  encoding of the empty prompt, classifier-free guidance's unconditional input (what the
  pipelines use when no negative prompt is given);
* ``index.json`` -- format and version, encoder name, ``num_prompts`` / ``seq_len`` / ``dim`` /
  ``dtype``, ``pooled_dim`` (0, or absent in older directories: no pooled embedding), the prompts,
  and the shard files with their row counts.

:class:`TextEmbeddingShards` reads such a directory, :class:`SyntheticTextEmbeddings` offers the
same interface with fixed random embeddings (smoke runs), and :class:`PromptSampler` draws each
data-parallel rank's prompts as a pure function of ``(seed, iteration, dp_rank)`` so a resumed
run sees exactly the prompts the interrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adm_megatron.data.batch_layout import BatchLayout
from adm_megatron.data.epochs import EpochStream, mix_seed
from adm_megatron.data.safetensors_rows import ShardedRows
from adm_megatron.file_fingerprint import file_fingerprint
from adm_megatron.file_modes import give_umask_modes

logger = logging.getLogger("adm_megatron")
FORMAT = "adm-megatron/text-embeddings"
VERSION = 1
INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.safetensors"
KEY = "embeddings"
POOLED_KEY = "pooled"
DTYPES = {  # index.json name -> (torch dtype, safetensors header name)
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """The index.json name of a supported embedding dtype."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported embedding dtype {dtype} (supported: {', '.join(DTYPES)})")
    return _DTYPE_NAMES[dtype]


class TextEmbeddingSource(Protocol):
    """What the trainer needs from a prompt set (shards on disk or synthetic)."""

    seq_len: int
    dim: int
    pooled_dim: int  # 0: no pooled embedding

    def __len__(self) -> int: ...

    @property
    def prompts(self) -> Sequence[str]: ...

    def get(self, indices: torch.Tensor) -> torch.Tensor: ...

    def negative(self) -> torch.Tensor: ...

    def get_pooled(self, indices: torch.Tensor) -> torch.Tensor: ...

    def negative_pooled(self) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


def _check_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    if indices.dim() != 1 or indices.dtype != torch.long:
        raise ValueError(f"indices must be a 1-D LongTensor, got shape {tuple(indices.shape)} {indices.dtype}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= size):
        raise IndexError(f"prompt index out of range [0, {size}): {indices.tolist()}")
    return indices.cpu()


# -- writing -------------------------------------------------------------------------------------


def _tmp_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_killed_writers(out_dir: str) -> list[str]:
    """Remove the temporary directories beside ``out_dir`` that writers of it killed on this host
    left (``.NAME.tmp-HOST-PID-*`` of a PID that is gone, and the ``-old`` copy a replaced ``out_dir``
    waits in: a kill -9 or an OOM kill skips the clean-up, and each left up to a whole prompt set's
    embeddings, hidden); returns them. Those of live writers, of other hosts or of older versions
    (no host and PID in the name) are left alone and named in a warning."""
    parent, prefix = os.path.dirname(os.path.abspath(out_dir)), _tmp_prefix(out_dir)
    host = socket.gethostname()
    removed, others = [], []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path, rest = os.path.join(parent, name), name[len(prefix):]
        if not (name.startswith(prefix) and os.path.isdir(path)):
            continue
        pid = rest[len(host) + 1:].split("-", 1)[0] if rest.startswith(f"{host}-") else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        else:
            others.append(path)
    if removed:
        logger.warning("%s: removed %d temporary director%s of writers killed before they finished (%s)", out_dir,
                       len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
    if others:
        logger.warning("%s: %s: temporary director%s of another writer of it (still running, on another host, or from "
                       "an older version); remove %s once no other writer is running", out_dir, ", ".join(others),
                       "y" if len(others) == 1 else "ies", "it" if len(others) == 1 else "them")
    return removed


class EmbeddingShardWriter:
    """Streams ``[n, L, D]`` chunks (with ``[n, P]`` pooled rows when ``negative_pooled`` is
    given) into fixed-size shards inside a temporary directory next to ``out_dir``; :meth:`close`
    writes the negative and the index, then renames the directory into place. Used as a context
    manager, an exception removes the temporary directory, so ``out_dir`` is either complete or
    untouched; one a killed writer left is removed by the next writer (:func:`remove_killed_writers`)."""

    def __init__(
        self,
        out_dir: str,
        negative: torch.Tensor,
        shard_size: int = 256,
        encoder: str = "",
        overwrite: bool = False,
        negative_pooled: torch.Tensor | None = None,
    ):
        if negative.dim() != 2:
            raise ValueError(f"negative embedding must be [L, D], got shape {tuple(negative.shape)}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = os.path.abspath(out_dir)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise FileExistsError(f"{self.out_dir}: exists and is not a directory")
        if os.path.isdir(self.out_dir) and os.listdir(self.out_dir) and not overwrite:
            raise FileExistsError(f"{self.out_dir}: output directory is not empty (pass overwrite=True)")
        self.negative = negative.detach().cpu().contiguous()
        if negative_pooled is not None and (negative_pooled.dim() != 1 or negative_pooled.dtype != negative.dtype):
            raise ValueError(f"negative pooled embedding must be [P] of {negative.dtype}, "
                             f"got {tuple(negative_pooled.shape)} {negative_pooled.dtype}")
        self.negative_pooled = None if negative_pooled is None else negative_pooled.detach().cpu().contiguous()
        self.dtype = dtype_name(self.negative.dtype)
        self.shard_size = shard_size
        self.encoder = encoder
        os.makedirs(os.path.dirname(self.out_dir), exist_ok=True)
        self._prompts: list[str] = []
        self._pending = self.negative.new_empty(0, *self.negative.shape)  # rows not yet in a shard
        self._pending_pooled = None if self.negative_pooled is None else self.negative.new_empty(0, len(self.negative_pooled))
        self._shards: list[dict] = []
        self._tmp = self._work_dir()

    def _work_dir(self) -> str:
        """Where the shards are written until :meth:`close` moves them into place: a new temporary
        directory beside ``out_dir`` (those killed writers left removed first)."""
        remove_killed_writers(self.out_dir)
        return tempfile.mkdtemp(prefix=f"{_tmp_prefix(self.out_dir)}{socket.gethostname()}-{os.getpid()}-",
                                dir=os.path.dirname(self.out_dir))

    def add(self, prompts: Sequence[str], embeddings: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """Append ``len(prompts)`` rows (and their ``[n, P]`` pooled rows, exactly when the writer
        has a negative pooled embedding); full shards are written as soon as they fill."""
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        expected = (len(prompts), *self.negative.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"embeddings shape {tuple(embeddings.shape)} != (len(prompts), L, D) = {expected}")
        if embeddings.dtype != self.negative.dtype:
            raise ValueError(f"embeddings dtype {embeddings.dtype} != negative dtype {self.negative.dtype}")
        if (pooled is None) != (self.negative_pooled is None):
            raise ValueError("pooled rows must be given exactly when the writer has a negative pooled embedding")
        if pooled is not None:
            expected_pooled = (len(prompts), len(self.negative_pooled))
            if tuple(pooled.shape) != expected_pooled or pooled.dtype != self.negative.dtype:
                raise ValueError(f"pooled shape {tuple(pooled.shape)} {pooled.dtype} != (len(prompts), P) = "
                                 f"{expected_pooled} {self.negative.dtype}")
            self._pending_pooled = torch.cat([self._pending_pooled, pooled.detach().cpu()])
        self._prompts.extend(prompts)
        rows = embeddings.detach().cpu()
        self._pending = torch.cat([self._pending, rows]) if len(self._pending) else rows
        while len(self._pending) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        name = shard_name(len(self._shards))
        tensors = {KEY: self._pending[:rows].contiguous()}
        if self._pending_pooled is not None:
            tensors[POOLED_KEY] = self._pending_pooled[:rows].contiguous()
            self._pending_pooled = self._pending_pooled[rows:]
        save_file(tensors, os.path.join(self._tmp, name + ".tmp"))
        os.replace(os.path.join(self._tmp, name + ".tmp"), os.path.join(self._tmp, name))  # whole or absent
        self._shards.append({"file": name, "rows": rows})
        self._pending = self._pending[rows:]
        self._shard_written()

    def _shard_written(self) -> None:
        """Called once each shard is in the work directory (what a resumable writer records)."""

    def close(self) -> str:
        """Write the last shard, the negative and the index; move the result to ``out_dir``."""
        if not self._prompts:
            raise ValueError(f"{self.out_dir}: no prompts were added")
        if len(self._pending):
            self._flush(len(self._pending))
        negative = {KEY: self.negative}
        if self.negative_pooled is not None:
            negative[POOLED_KEY] = self.negative_pooled
        save_file(negative, os.path.join(self._tmp, NEGATIVE_FILE))
        seq_len, dim = self.negative.shape
        index = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": self.encoder,
            "num_prompts": len(self._prompts),
            "seq_len": seq_len,
            "dim": dim,
            "dtype": self.dtype,
            "pooled_dim": 0 if self.negative_pooled is None else len(self.negative_pooled),
            "negative": NEGATIVE_FILE,
            "shards": self._shards,
            "prompts": self._prompts,
        }
        with open(os.path.join(self._tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=1)
        self._move_into_place()
        return self.out_dir

    def _move_into_place(self) -> None:
        give_umask_modes(self._tmp)  # mkdtemp and safetensors create owner-only modes
        old = None
        if os.path.isdir(self.out_dir):
            old = self._tmp + "-old"
            os.rename(self.out_dir, old)
        os.rename(self._tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "EmbeddingShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_embedding_shards(
    out_dir: str,
    prompts: Sequence[str],
    embeddings: torch.Tensor,
    negative: torch.Tensor,
    shard_size: int = 256,
    encoder: str = "",
    overwrite: bool = False,
    pooled: torch.Tensor | None = None,
    negative_pooled: torch.Tensor | None = None,
) -> str:
    """Write ``embeddings`` ``[N, L, D]`` (row i encodes ``prompts[i]``) and ``negative``
    ``[L, D]`` (optionally with ``pooled`` ``[N, P]`` and ``negative_pooled`` ``[P]``) as a
    shard directory (see the module docstring); returns ``out_dir``."""
    with EmbeddingShardWriter(out_dir, negative, shard_size, encoder, overwrite, negative_pooled) as writer:
        writer.add(prompts, embeddings, pooled)
        return writer.close()


# -- reading -------------------------------------------------------------------------------------


class TextEmbeddingShards:
    """A shard directory written by :func:`write_embedding_shards`. The index and every file's
    safetensors header are validated on construction; rows are read lazily (memory-mapped shard
    handles are opened on first use and kept). Returned tensors may be shared: do not modify them
    in place."""

    def __init__(self, path: str):
        self.path = path
        self._index_path = os.path.join(path, INDEX_FILE)
        index = self._read_index()
        self.encoder: str = index["encoder"]
        self.seq_len: int = index["seq_len"]
        self.dim: int = index["dim"]
        self.pooled_dim: int = index.get("pooled_dim", 0)
        self.dtype: torch.dtype = DTYPES[index["dtype"]][0]
        self._prompts: list[str] = index["prompts"]
        self._files = [os.path.join(path, s["file"]) for s in index["shards"]]
        rows = [s["rows"] for s in index["shards"]]
        self._negative_file = os.path.join(path, index["negative"])
        self._negative: dict[str, torch.Tensor] | None = None
        for i, (file, n) in enumerate(zip(self._files, rows)):
            self._check_file(file, f"shards[{i}].file", {KEY: [n, self.seq_len, self.dim], POOLED_KEY: [n, self.pooled_dim]},
                             index["dtype"])
        self._check_file(self._negative_file, "negative", {KEY: [self.seq_len, self.dim], POOLED_KEY: [self.pooled_dim]},
                         index["dtype"])
        self._shards = ShardedRows(self._files, rows)  # headers only (safetensors_rows.py)

    def _fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self._index_path}: key {key!r} {problem}")

    def _read_index(self) -> dict:
        if not os.path.isfile(self._index_path):
            raise FileNotFoundError(f"{self._index_path}: index file not found")
        try:
            with open(self._index_path) as f:
                index = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self._index_path}: invalid JSON ({err})") from None
        if not isinstance(index, dict):
            raise ValueError(f"{self._index_path}: expected a JSON object, got {type(index).__name__}")
        types = {"format": str, "version": int, "encoder": str, "num_prompts": int, "seq_len": int,
                 "dim": int, "dtype": str, "negative": str, "shards": list, "prompts": list}
        for key, kind in types.items():
            if key not in index:
                raise self._fail(key, "is missing")
            if not isinstance(index[key], kind) or isinstance(index[key], bool):
                raise self._fail(key, f"must be {kind.__name__}, got {index[key]!r:.80}")
        if index["format"] != FORMAT:
            raise self._fail("format", f"is {index['format']!r}, expected {FORMAT!r}")
        if index["version"] != VERSION:
            raise self._fail("version", f"is {index['version']}, this reader supports {VERSION}")
        if index["dtype"] not in DTYPES:
            raise self._fail("dtype", f"is {index['dtype']!r}, expected one of {list(DTYPES)}")
        for key in ("num_prompts", "seq_len", "dim"):
            if index[key] < 1:
                raise self._fail(key, f"must be >= 1, got {index[key]}")
        pooled_dim = index.get("pooled_dim", 0)
        if not isinstance(pooled_dim, int) or isinstance(pooled_dim, bool) or pooled_dim < 0:
            raise self._fail("pooled_dim", f"must be an int >= 0, got {pooled_dim!r:.80}")
        if len(index["prompts"]) != index["num_prompts"]:
            raise self._fail("prompts", f"has {len(index['prompts'])} entries, "
                                        f"num_prompts is {index['num_prompts']}")
        for i, shard in enumerate(index["shards"]):
            ok = (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                  and isinstance(shard.get("rows"), int) and shard["rows"] >= 1)
            if not ok:
                raise self._fail(f"shards[{i}]", f"must be {{'file': str, 'rows': int >= 1}}, "
                                                  f"got {shard!r:.80}")
        total = sum(s["rows"] for s in index["shards"])
        if total != index["num_prompts"]:
            raise self._fail("shards", f"hold {total} rows in all, num_prompts is {index['num_prompts']}")
        return index

    def _check_file(self, file: str, key: str, shapes: dict[str, list[int]], dtype: str) -> None:
        """``shapes``: tensor name -> the shape index.json implies (``pooled`` only read when
        ``pooled_dim`` > 0)."""
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{self._index_path}: key {key!r} names {file}, which does not exist")
        wanted = {name: shape for name, shape in shapes.items() if name == KEY or self.pooled_dim}
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
                found = {}
                for name in wanted:
                    if name not in keys:
                        raise ValueError(f"{file}: tensor {name!r} not found (has {keys})")
                    found[name] = (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype())
        except SafetensorError as err:
            raise ValueError(f"{file}: unreadable safetensors file ({err})") from None
        for name, shape in wanted.items():
            found_shape, found_dtype = found[name]
            if found_shape != shape:
                raise ValueError(f"{file}: tensor {name!r} has shape {found_shape}, index.json ({key}) says {shape}")
            if found_dtype != DTYPES[dtype][1]:
                raise ValueError(f"{file}: tensor {name!r} has dtype {found_dtype}, index.json says {dtype}")

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    def fingerprint(self) -> str:
        """The SHA-256 of the prompts' text and of the embedding files' cheap fingerprint
        (``adm_megatron/file_fingerprint.py``; index.json has no hash of its own): the same for a
        copy, another for the prompts or their embeddings re-encoded."""
        files = file_fingerprint(self.path, [*self._files, self._negative_file])
        return hashlib.sha256(json.dumps([self._prompts, files]).encode()).hexdigest()

    def _rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Only the rows asked are read, and none is kept: a run holds a batch of embeddings, not the
        shards it has touched."""
        return self._shards.get(name, _check_indices(indices, len(self)))

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (a 1-D LongTensor) as ``[B, L, D]`` in the stored dtype."""
        return self._rows(KEY, indices)

    def get_pooled(self, indices: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings of rows ``indices`` as ``[B, P]`` (the directory must have them)."""
        self._need_pooled()
        return self._rows(POOLED_KEY, indices)

    def _need_pooled(self) -> None:
        if not self.pooled_dim:
            raise ValueError(f"{self._index_path}: these embeddings have no pooled part (pooled_dim 0); "
                             "the model needs an encoder with pooled outputs (SD3's)")

    def _negative_tensors(self) -> dict[str, torch.Tensor]:
        if self._negative is None:
            with safe_open(self._negative_file, framework="pt") as f:
                self._negative = {name: f.get_tensor(name) for name in f.keys()}
        return self._negative

    def negative(self) -> torch.Tensor:
        """The empty-prompt embedding ``[L, D]`` (read once)."""
        return self._negative_tensors()[KEY]

    def negative_pooled(self) -> torch.Tensor:
        """The empty prompt's pooled embedding ``[P]``."""
        self._need_pooled()
        return self._negative_tensors()[POOLED_KEY]


# -- synthetic -----------------------------------------------------------------------------------


class SyntheticTextEmbeddings:
    """Fixed random embeddings with the :class:`TextEmbeddingShards` interface: row ``i`` is
    standard normal (unit variance, like T5 encoder outputs) from a generator seeded by
    ``(seed, i)``, followed (``pooled_dim`` > 0) by its pooled row; the negative uses its own
    stream. Nothing is stored."""

    _NEGATIVE_ROW = -1

    def __init__(
        self, num_prompts: int, seq_len: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32,
        pooled_dim: int = 0,
    ):
        for name, value in (("num_prompts", num_prompts), ("seq_len", seq_len), ("dim", dim)):
            if value < 1:
                raise ValueError(f"SyntheticTextEmbeddings: {name} must be >= 1, got {value}")
        if pooled_dim < 0:
            raise ValueError(f"SyntheticTextEmbeddings: pooled_dim must be >= 0, got {pooled_dim}")
        self.pooled_dim = pooled_dim
        self._num_prompts = num_prompts
        self.seq_len = seq_len
        self.dim = dim
        self.seed = seed
        self.dtype = dtype
        self.encoder = "synthetic"

    def __len__(self) -> int:
        return self._num_prompts

    @property
    def prompts(self) -> list[str]:
        return [f"synthetic prompt {i}" for i in range(self._num_prompts)]

    def fingerprint(self) -> str:
        """The SHA-256 of what the rows are drawn from (row ``i`` depends on these and ``i`` alone)."""
        spec = ["synthetic", self.seed, self.seq_len, self.dim, self.pooled_dim, str(self.dtype)]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    def _row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, i))
        embedding = torch.randn(self.seq_len, self.dim, generator=g).to(self.dtype)
        return embedding, torch.randn(self.pooled_dim, generator=g).to(self.dtype)

    def _stack(self, indices: torch.Tensor, part: int, row_shape: tuple[int, ...]) -> torch.Tensor:
        indices = _check_indices(indices, len(self))
        if not indices.numel():
            return torch.empty(0, *row_shape, dtype=self.dtype)
        return torch.stack([self._row(i)[part] for i in indices.tolist()])

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        return self._stack(indices, 0, (self.seq_len, self.dim))

    def get_pooled(self, indices: torch.Tensor) -> torch.Tensor:
        return self._stack(indices, 1, (self.pooled_dim,))

    def negative(self) -> torch.Tensor:
        return self._row(self._NEGATIVE_ROW)[0]

    def negative_pooled(self) -> torch.Tensor:
        return self._row(self._NEGATIVE_ROW)[1]


def open_text_source(kind: str, path: str, num_prompts: int, seq_len: int, dim: int,
                     seed: int, pooled_dim: int = 0) -> TextEmbeddingSource:
    """A run's prompt set: ``kind`` 'shards' (the directory ``path``) or 'synthetic'
    (``pooled_dim`` > 0: with pooled embeddings, as SD3 needs)."""
    if kind == "shards":
        return TextEmbeddingShards(path)
    return SyntheticTextEmbeddings(num_prompts, seq_len, dim, seed=seed, pooled_dim=pooled_dim)


# -- sampling ------------------------------------------------------------------------------------


class PromptSampler:
    """Each data-parallel rank's prompts for an iteration and micro-batch, with no state to
    checkpoint: epochs over the prompt set (``adm_megatron.data.epochs``, seeded by ``(seed, epoch)``),
    so every prompt is seen once per epoch and a resumed run draws what it would have drawn."""

    def __init__(self, source: TextEmbeddingSource, layout: BatchLayout, seed: int):
        self.source = source
        self.stream = EpochStream(len(source), layout, seed)  # (refuses an empty prompt set)

    def indices(self, iteration: int, micro: int = 0) -> torch.Tensor:
        """This rank's ``[batch_size]`` prompt indices for ``iteration`` (>= 0), micro-batch ``micro``."""
        return self.stream.indices(iteration, micro)

    def batch(self, iteration: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, negative)``, both ``[batch_size, L, D]``."""
        embeds = self.source.get(self.indices(iteration, micro))
        negative = self.source.negative().unsqueeze(0).expand_as(embeds).clone()
        return embeds, negative

    def pooled(self, iteration: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(pooled, negative pooled)``, both ``[batch_size, P]``, for the prompts of
        :meth:`batch`; None when the source has no pooled embeddings."""
        if not self.source.pooled_dim:
            return None
        pooled = self.source.get_pooled(self.indices(iteration, micro))
        return pooled, self.source.negative_pooled().unsqueeze(0).expand_as(pooled).clone()
