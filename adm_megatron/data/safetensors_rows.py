"""Single rows of the tensors of a safetensors file, read without reading the file: its header gives
each tensor's dtype, shape and byte range, and a row of a (row-major) tensor is one contiguous range
of that, read with ``os.preadv``. Nothing but the header is kept, and the file's identity: a file
replaced or rewritten since (data re-encoded or recollected under a running run) is refused at the
next read, not read through the old header. :class:`ShardedRows` does the
same over a set of shard files that hold consecutive rows (ODE pairs, text embeddings).

Why not the library's readers (safetensors 0.8): the torch one copies the whole file into memory at
the first access and an open handle keeps it -- a 256-pair CogVideoX ODE shard is 2.3 GB, read again
for every batch, and every text-embedding shard a run touched stayed in memory, until a long run held
the whole prompt set on every rank; the numpy one slices the mapped file but has no bfloat16, the
dtype text embeddings are stored in.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

# safetensors' dtype names (its format spec) -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """Which file a path named: replaced (another inode, as every writer of shards here replaces them)
    or rewritten in place to another size. Not its modification time: ``touch``, which clusters'
    scratch purges make users run over their data, changes nothing a reader reads."""
    return stat.st_dev, stat.st_ino, stat.st_size


def check_safetensors_file(path: str) -> tuple[dict, int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets; ``__metadata__`` left out) and
    the offset its data starts at, from its header alone; a one-line ``ValueError`` naming the file
    when it is not one or is shorter than its header says (a cut copy or download: found when the
    file is opened, not when a row past the cut is first read)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise ValueError("header cut short")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes; truncated?)") from None
    if size < 8 + length + end:
        raise ValueError(f"{path}: truncated ({size} bytes, its header needs {8 + length + end})")
    return header, 8 + length


class SafetensorsRows:
    """The rows of one safetensors file's tensors; ``ValueError`` naming the file for what is not one
    (:func:`check_safetensors_file`)."""

    def __init__(self, path: str):
        self.path = path
        self._identity = _identity(os.stat(path))
        self.tensors, self.data_start = check_safetensors_file(path)

    def shape(self, key: str) -> list[int]:
        return list(self.tensors[key]["shape"])

    def rows(self, key: str, indices: list[int]) -> torch.Tensor:
        """``[len(indices), *row shape]``: rows ``indices`` of tensor ``key``, in that order."""
        info = self.tensors[key]
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        start = self.data_start + info["data_offsets"][0]
        out = torch.empty(len(indices), *shape[1:], dtype=dtype)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())  # the rows land in ``out`` directly
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _identity(os.fstat(fd)) != self._identity:  # the header read at the start describes another file
                raise ValueError(f"{self.path}: replaced or rewritten since it was opened (re-encoded or recollected "
                                 "under a running run?); a run's data must not change while it reads them")
            for i, row in enumerate(indices):
                if not 0 <= row < shape[0]:
                    raise IndexError(f"{self.path}: row {row} of {key!r}, which has {shape[0]}")
                if os.preadv(fd, [buffer[i * row_bytes:(i + 1) * row_bytes]], start + row * row_bytes) != row_bytes:
                    raise ValueError(f"{self.path}: truncated ({key!r} row {row} is short)")
        finally:
            os.close(fd)
        return out


class ShardedRows:
    """Rows of tensors split over shard files, shard ``i`` holding ``rows[i]`` consecutive rows; every
    file's header is read (and its length checked) at construction, its rows at each call."""

    def __init__(self, files: list[str], rows: list[int]):
        self.starts = torch.tensor([0, *rows]).cumsum(0)
        self._readers = [SafetensorsRows(file) for file in files]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (1-D, global row numbers) of tensor ``key``, in that order, one read per
        shard they fall in."""
        shards = torch.searchsorted(self.starts, indices, right=True) - 1
        out = None
        for shard in shards.unique().tolist():
            positions = (shards == shard).nonzero().flatten()
            read = self._readers[shard].rows(key, (indices[positions] - self.starts[shard]).tolist())
            if out is None:
                out = read.new_empty((len(indices), *read.shape[1:]))
            out[positions] = read
        return out if out is not None else self._readers[0].rows(key, [])  # no rows asked
