"""Single rows of the tensors of a safetensors file, read without reading the file: its header gives
each tensor's dtype, shape and byte range, and a row of a (row-major) tensor is one contiguous range
of that, read with ``os.pread``. Nothing but the header is kept.

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
