"""Precomputed text embeddings: sharded safetensors on disk, a synthetic stand-in, a sampler.

The trainer never runs the text encoder: prompts are encoded once (``tools/
precompute_text_embeddings.py``) into a directory of

* ``shard-00000.safetensors`` ... -- key ``embeddings``, ``[rows, L, D]``, in prompt order;
* ``negative.safetensors`` -- key ``embeddings``, ``[L, D]``: the encoding of the empty prompt,
  classifier-free guidance's unconditional input (what ``CogVideoXPipeline`` uses when no
  negative prompt is given);
* ``index.json`` -- format and version, encoder name, ``num_prompts`` / ``seq_len`` / ``dim`` /
  ``dtype``, the prompts, and the shard files with their row counts.

:class:`TextEmbeddingShards` reads such a directory, :class:`SyntheticTextEmbeddings` offers the
same interface with fixed random embeddings (smoke runs), and :class:`PromptSampler` draws each
data-parallel rank's prompts as a pure function of ``(seed, iteration, dp_rank)`` so a resumed
run sees exactly the prompts the interrupted one would have.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "adm-megatron/text-embeddings"
VERSION = 1
INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.safetensors"
KEY = "embeddings"
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

    def __len__(self) -> int: ...

    @property
    def prompts(self) -> Sequence[str]: ...

    def get(self, indices: torch.Tensor) -> torch.Tensor: ...

    def negative(self) -> torch.Tensor: ...


def _check_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    if indices.dim() != 1 or indices.dtype != torch.long:
        raise ValueError(f"indices must be a 1-D LongTensor, got shape {tuple(indices.shape)} {indices.dtype}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= size):
        raise IndexError(f"prompt index out of range [0, {size}): {indices.tolist()}")
    return indices.cpu()


# -- writing -------------------------------------------------------------------------------------


class EmbeddingShardWriter:
    """Streams ``[n, L, D]`` chunks into fixed-size shards inside a temporary directory next to
    ``out_dir``; :meth:`close` writes the negative and the index, then renames the directory into
    place. Used as a context manager, an exception removes the temporary directory, so ``out_dir``
    is either complete or untouched."""

    def __init__(
        self,
        out_dir: str,
        negative: torch.Tensor,
        shard_size: int = 256,
        encoder: str = "",
        overwrite: bool = False,
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
        self.dtype = dtype_name(self.negative.dtype)
        self.shard_size = shard_size
        self.encoder = encoder
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.tmp-", dir=parent)
        self._prompts: list[str] = []
        self._pending = self.negative.new_empty(0, *self.negative.shape)  # rows not yet in a shard
        self._shards: list[dict] = []

    def add(self, prompts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Append ``len(prompts)`` rows; full shards are written as soon as they fill."""
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        expected = (len(prompts), *self.negative.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"embeddings shape {tuple(embeddings.shape)} != (len(prompts), L, D) = {expected}")
        if embeddings.dtype != self.negative.dtype:
            raise ValueError(f"embeddings dtype {embeddings.dtype} != negative dtype {self.negative.dtype}")
        self._prompts.extend(prompts)
        rows = embeddings.detach().cpu()
        self._pending = torch.cat([self._pending, rows]) if len(self._pending) else rows
        while len(self._pending) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        name = shard_name(len(self._shards))
        save_file({KEY: self._pending[:rows].contiguous()}, os.path.join(self._tmp, name))
        self._shards.append({"file": name, "rows": rows})
        self._pending = self._pending[rows:]

    def close(self) -> str:
        """Write the last shard, the negative and the index; move the result to ``out_dir``."""
        if not self._prompts:
            raise ValueError(f"{self.out_dir}: no prompts were added")
        if len(self._pending):
            self._flush(len(self._pending))
        save_file({KEY: self.negative}, os.path.join(self._tmp, NEGATIVE_FILE))
        seq_len, dim = self.negative.shape
        index = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": self.encoder,
            "num_prompts": len(self._prompts),
            "seq_len": seq_len,
            "dim": dim,
            "dtype": self.dtype,
            "negative": NEGATIVE_FILE,
            "shards": self._shards,
            "prompts": self._prompts,
        }
        with open(os.path.join(self._tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=1)
        self._move_into_place()
        return self.out_dir

    def _move_into_place(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(self._tmp):  # mkdtemp and safetensors create owner-only modes
            os.chmod(os.path.join(self._tmp, name), 0o666 & ~umask)
        os.chmod(self._tmp, 0o777 & ~umask)
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
) -> str:
    """Write ``embeddings`` ``[N, L, D]`` (row i encodes ``prompts[i]``) and ``negative``
    ``[L, D]`` as a shard directory (see the module docstring); returns ``out_dir``."""
    with EmbeddingShardWriter(out_dir, negative, shard_size, encoder, overwrite) as writer:
        writer.add(prompts, embeddings)
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
        self.dtype: torch.dtype = DTYPES[index["dtype"]][0]
        self._prompts: list[str] = index["prompts"]
        self._files = [os.path.join(path, s["file"]) for s in index["shards"]]
        rows = [s["rows"] for s in index["shards"]]
        self._starts = torch.tensor([0] + rows).cumsum(0)
        self._negative_file = os.path.join(path, index["negative"])
        self._negative: torch.Tensor | None = None
        self._handles: dict[int, object] = {}
        for i, (file, n) in enumerate(zip(self._files, rows)):
            self._check_file(file, f"shards[{i}].file", [n, self.seq_len, self.dim], index["dtype"])
        self._check_file(self._negative_file, "negative", [self.seq_len, self.dim], index["dtype"])

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

    def _check_file(self, file: str, key: str, shape: list[int], dtype: str) -> None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{self._index_path}: key {key!r} names {file}, which does not exist")
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
                if KEY not in keys:
                    raise ValueError(f"{file}: tensor {KEY!r} not found (has {keys})")
                found_shape, found_dtype = f.get_slice(KEY).get_shape(), f.get_slice(KEY).get_dtype()
        except SafetensorError as err:
            raise ValueError(f"{file}: unreadable safetensors file ({err})") from None
        if found_shape != shape:
            raise ValueError(f"{file}: tensor {KEY!r} has shape {found_shape}, index.json ({key}) says {shape}")
        if found_dtype != DTYPES[dtype][1]:
            raise ValueError(f"{file}: tensor {KEY!r} has dtype {found_dtype}, index.json says {dtype}")

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._files[shard], framework="pt")
        return self._handles[shard]

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (a 1-D LongTensor) as ``[B, L, D]`` in the stored dtype."""
        indices = _check_indices(indices, len(self))
        shards = torch.searchsorted(self._starts, indices, right=True) - 1
        out = torch.empty(len(indices), self.seq_len, self.dim, dtype=self.dtype)
        for i, (index, shard) in enumerate(zip(indices.tolist(), shards.tolist())):
            row = index - self._starts[shard].item()
            out[i] = self._handle(shard).get_slice(KEY)[row : row + 1][0]
        return out

    def negative(self) -> torch.Tensor:
        """The empty-prompt embedding ``[L, D]`` (read once)."""
        if self._negative is None:
            with safe_open(self._negative_file, framework="pt") as f:
                self._negative = f.get_tensor(KEY)
        return self._negative


# -- synthetic -----------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SyntheticTextEmbeddings:
    """Fixed random embeddings with the :class:`TextEmbeddingShards` interface: row ``i`` is
    standard normal (unit variance, like T5 encoder outputs) from a generator seeded by
    ``(seed, i)``; the negative uses its own stream. Nothing is stored."""

    _NEGATIVE_ROW = -1

    def __init__(
        self, num_prompts: int, seq_len: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32
    ):
        for name, value in (("num_prompts", num_prompts), ("seq_len", seq_len), ("dim", dim)):
            if value < 1:
                raise ValueError(f"SyntheticTextEmbeddings: {name} must be >= 1, got {value}")
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

    def _row(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, i))
        return torch.randn(self.seq_len, self.dim, generator=g).to(self.dtype)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        indices = _check_indices(indices, len(self))
        if not indices.numel():
            return torch.empty(0, self.seq_len, self.dim, dtype=self.dtype)
        return torch.stack([self._row(i) for i in indices.tolist()])

    def negative(self) -> torch.Tensor:
        return self._row(self._NEGATIVE_ROW)


def open_text_source(kind: str, path: str, num_prompts: int, seq_len: int, dim: int,
                     seed: int) -> TextEmbeddingSource:
    """A run's prompt set: ``kind`` 'shards' (the directory ``path``) or 'synthetic'."""
    if kind == "shards":
        return TextEmbeddingShards(path)
    return SyntheticTextEmbeddings(num_prompts, seq_len, dim, seed=seed)


# -- sampling ------------------------------------------------------------------------------------


class PromptSampler:
    """Each data-parallel rank's prompt indices for an iteration, with no state to checkpoint.

    The prompts form an endless stream of epochs, each a permutation of ``range(len(source))``
    drawn from a generator seeded by ``(seed, epoch)``. Iteration ``i`` consumes stream positions
    ``[i G, (i + 1) G)`` with ``G = batch_size * dp_size``, and rank ``r`` takes the ``r``-th
    ``batch_size`` of them. So every prompt is seen once per epoch, the ranks of one iteration
    draw different prompts (unless ``G`` exceeds the prompt count or the batch straddles two
    epochs), and ``indices(i)`` depends only on ``(seed, i, dp_rank, dp_size)``: exact resume.
    The global batch (all ranks' indices in rank order) depends only on ``(seed, i, G)``, not on
    how ``G`` is split over ranks.
    """

    def __init__(
        self, source: TextEmbeddingSource, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1
    ):
        if batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptSampler: dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if len(source) < 1:
            raise ValueError("PromptSampler: the prompt source is empty")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._epochs: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._epochs[epoch] = torch.randperm(len(self.source), generator=g)
        return self._epochs[epoch]

    def indices(self, iteration: int) -> torch.Tensor:
        """This rank's ``[batch_size]`` prompt indices for ``iteration`` (>= 0)."""
        if iteration < 0:
            raise ValueError(f"PromptSampler: iteration must be >= 0, got {iteration}")
        n = len(self.source)
        start = (iteration * self.dp_size + self.dp_rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack([self._permutation(p // n)[p % n] for p in positions])

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, negative)``, both ``[batch_size, L, D]``."""
        embeds = self.source.get(self.indices(iteration))
        negative = self.source.negative().unsqueeze(0).expand_as(embeds).clone()
        return embeds, negative
