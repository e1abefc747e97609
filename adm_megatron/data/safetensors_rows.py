"""Single rows of the tensors of a safetensors file, read without reading the file: its header gives
each tensor's dtype, shape and byte range, and a row of a (row-major) tensor is one contiguous range
of that, read with ``os.preadv``. Nothing but the header is kept. :class:`ShardedRows` does the
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


class SafetensorsRows:
    """The rows of one safetensors file's tensors; ``ValueError`` naming the file for what is not one."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > os.fstat(f.fileno()).st_size - 8:
                    raise ValueError(f"a header of {length} bytes")
                header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.tensors = header
        self.data_start = 8 + length

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
            for i, row in enumerate(indices):
                if not 0 <= row < shape[0]:
                    raise IndexError(f"{self.path}: row {row} of {key!r}, which has {shape[0]}")
                if os.preadv(fd, [buffer[i * row_bytes:(i + 1) * row_bytes]], start + row * row_bytes) != row_bytes:
                    raise ValueError(f"{self.path}: truncated ({key!r} row {row} is short)")
        finally:
            os.close(fd)
        return out


class ShardedRows:
    """Rows of tensors split over shard files, shard ``i`` holding ``rows[i]`` consecutive rows; each
    file's header is read once, its rows at each call."""

    def __init__(self, files: list[str], rows: list[int]):
        self.files = list(files)
        self.starts = torch.tensor([0, *rows]).cumsum(0)
        self._readers: dict[int, SafetensorsRows] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _reader(self, shard: int) -> SafetensorsRows:
        if shard not in self._readers:
            self._readers[shard] = SafetensorsRows(self.files[shard])
        return self._readers[shard]

    def get(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (1-D, global row numbers) of tensor ``key``, in that order, one read per
        shard they fall in."""
        shards = torch.searchsorted(self.starts, indices, right=True) - 1
        out = None
        for shard in shards.unique().tolist():
            positions = (shards == shard).nonzero().flatten()
            read = self._reader(shard).rows(key, (indices[positions] - self.starts[shard]).tolist())
            if out is None:
                out = read.new_empty((len(indices), *read.shape[1:]))
            out[positions] = read
        return out if out is not None else self._reader(0).rows(key, [])  # no rows asked
