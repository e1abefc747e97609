"""Teacher ODE pairs on disk: the "real" samples of a distillation (DMD2's real side, ADP's data).

A directory of

* ``pairs-00000.safetensors`` ... -- keys ``x_T`` and ``x_0`` (``[rows, F, C, H, W]``, the PF-ODE's
  start and end), ``prompt_id`` (``[rows]`` int64, the row of the prompt set it was sampled with)
  and ``guidance_scale`` (``[rows]``, the CFG scale used); every shard is written to a temporary
  name and renamed, so a shard file is complete or absent;
* ``manifest.json`` -- format, version, the latent shape and dtype, the sampler settings (CFG range
  included), the teacher (path, kind, architecture and a fingerprint of its weights), the prompt
  set (source, path, row count and a fingerprint of the embeddings), and every shard with its row
  count and SHA-256; written (also atomically) once all shards exist. A directory without it is an
  unfinished collection. Manifests written before the fingerprints and row count lack them.

Shard ``i`` holds pairs ``[i S, (i + 1) S)`` of the collection (S = shard size); pair ``j`` uses
prompt ``j mod num_prompts`` and noise and scale drawn from a generator seeded by
``(seed, i)``: what a shard contains does not depend on which rank wrote it or when, so a killed
collection resumes by writing the missing shards only.

:class:`OdePairs` reads a finished directory; :class:`RealSampler` draws a training iteration's
real samples (and, for ADP, their starting noises) from it as a pure function of (seed, iteration): epochs
over the pairs, every pair once per epoch, each data-parallel rank keeping its rows of the global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adm_megatron.data.batch_layout import BatchLayout
from adm_megatron.data.epochs import EpochStream
from adm_megatron.data.safetensors_rows import ShardedRows
from adm_megatron.file_modes import give_umask_mode
from adm_megatron.json_file import read_json_object

FORMAT = "adm-megatron/ode-pairs"
VERSION = 1
MANIFEST = "manifest.json"
KEYS = ("x_T", "x_0", "prompt_id", "guidance_scale")
REAL_STREAM = zlib.crc32(b"real")  # the pairs' epochs are a stream apart from the prompts'


def shard_name(i: int) -> str:
    return f"pairs-{i:05d}.safetensors"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_generator(seed: int, shard: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, "ode-pairs", shard)).encode()) & 0x7FFFFFFF)


def teacher_identity(source) -> dict:
    """What a collection records of its teacher (a ``train.teacher.TeacherSource``) and training
    compares with its own: kind, architecture (as JSON holds it) and a weights fingerprint
    (``adm_megatron/file_fingerprint.py``)."""
    return {"kind": source.kind, "arch": json.loads(json.dumps(vars(source.arch))),
            "fingerprint": source.weights_fingerprint()}


def prompts_identity(text_source) -> dict:
    """What a collection records of its prompt embeddings (a ``TextEmbeddingSource``) and training
    compares with its own: their row count and content fingerprint."""
    return {"rows": len(text_source), "fingerprint": text_source.fingerprint()}


def write_shard(out_dir: str, index: int, tensors: dict[str, torch.Tensor]) -> str:
    """Write shard ``index`` under a temporary name, then rename it into place."""
    if set(tensors) != set(KEYS):
        raise ValueError(f"an ODE-pair shard holds exactly {KEYS}, got {sorted(tensors)}")
    path = os.path.join(out_dir, shard_name(index))
    tmp = os.path.join(out_dir, f".{shard_name(index)}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    give_umask_mode(tmp)  # safetensors creates it owner-only
    os.replace(tmp, path)
    return path


class OdePairs:
    """A finished ODE-pair directory (one with a manifest); bad ones fail in one line, a shard file
    missing or shorter than its safetensors header says (a cut copy) included, from the headers alone."""

    def __init__(self, path: str, key: str = "data.real_path"):
        self.path = path
        manifest = os.path.join(path, MANIFEST)
        if not os.path.exists(path):
            raise ValueError(f"{key}={path!r}: does not exist (expected an ODE-pair directory from "
                             "adm-megatron collect-ode)")
        if not os.path.isfile(manifest):
            raise ValueError(f"{key}={path!r}: no {MANIFEST} (not an ODE-pair directory, or an "
                             "unfinished collection: rerun tools/collect_ode_pairs.py to finish it)")
        self.manifest = read_json_object(manifest)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            if not os.path.isfile(os.path.join(path, shard["file"])):
                raise ValueError(f"{manifest}: shard {shard['file']} is missing")
        self._rows = ShardedRows([self._file(i) for i in range(len(self.shards))], [s["rows"] for s in self.shards])

    def __len__(self) -> int:
        return len(self._rows)

    def _file(self, i: int) -> str:
        return os.path.join(self.path, self.shards[i]["file"])

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i`` whole, every key, read from its file."""
        with safe_open(self._file(i), "pt") as f:
            return {k: f.get_tensor(k) for k in KEYS}

    def get(self, indices: torch.Tensor, key: str) -> torch.Tensor:
        """Rows ``indices`` (global pair indices) of tensor ``key``, in that order. Only those rows are
        read (``safetensors_rows.py``) and nothing is kept: host memory stays at a batch however many
        shards a run touches (whole shards kept once read grew to the whole collection on every
        rank: 100,000 CogVideoX pairs at 13 x 60 x 90 are 0.9 TB)."""
        return self._rows.get(key, indices)

    def verify(self) -> list[str]:
        """The shard files whose SHA-256 differs from the manifest's."""
        return [s["file"] for s in self.shards if sha256(os.path.join(self.path, s["file"])) != s["sha256"]]


class RealSampler:
    """Real samples for iteration i: epochs over the pairs (``adm_megatron.data.epochs``, a stream of
    its own beside the prompts'), each (rank, micro-batch) keeping its slot's rows of the global batch
    -- every pair once per epoch, no state to checkpoint, the same whatever the split of the global batch."""

    def __init__(self, pairs: OdePairs, layout: BatchLayout, seed: int):
        self.pairs = pairs
        self.stream = EpochStream(len(pairs), layout, seed, key=(REAL_STREAM,))

    def indices(self, iteration: int, micro: int = 0) -> torch.Tensor:
        return self.stream.indices(iteration, micro)

    def batch(self, iteration: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_T, x_0 [B, F, C, H, W], prompt ids [B])``: DMD2 reads x_0, ADP both ends."""
        idx = self.indices(iteration, micro)
        return self.pairs.get(idx, "x_T"), self.pairs.get(idx, "x_0"), self.pairs.get(idx, "prompt_id")
