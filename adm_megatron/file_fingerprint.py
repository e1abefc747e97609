"""Cheap content fingerprints of sets of large files: what an ODE-pair collection records of the
teacher's weights and of its prompt embeddings, so that training can tell pairs of another teacher
or prompt set from its own (``train/validate.py``) and a resumed collection can tell that its prompt
embeddings were re-encoded (``ode_collection.py``).

Why not a full SHA-256: it would be computed at every start of every run and every collection, over
the teacher's weights (CogVideoX-5b: 11 GB, SD3.5-Large: 16 GB) and the prompt embeddings (100,000
T5 prompts: 190 GB), minutes of disk reads on a shared file system. Instead: SHA-256 over each file's
name (relative to the directory, so a moved or copied directory keeps it), size, and three 64 KiB
samples (its first, middle and last; the whole of a smaller file). Copies of the same files always
agree; other weights or embeddings differ in size, in the safetensors header at the start (every
tensor's offsets), or in the sampled bytes, which any retraining, fine-tune or re-encoding of more
than a few rows changes. What it cannot see is an edit confined to the unsampled bytes.
"""

from __future__ import annotations

import hashlib
import os

SAMPLE_BYTES = 64 << 10


def file_fingerprint(root: str, files: list[str]) -> str:
    """The hex SHA-256 of ``files`` (paths under ``root``, in the order given): each one's name relative
    to ``root``, its size and its first, middle and last :data:`SAMPLE_BYTES`."""
    digest = hashlib.sha256()
    for path in files:
        size = os.path.getsize(path)
        digest.update(f"{os.path.relpath(path, root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def directory_fingerprint(root: str, parts: list[str] | None = None) -> str:
    """:func:`file_fingerprint` of every file under ``parts`` (directories under ``root``; default:
    ``root`` itself), walked in name order."""
    files = [os.path.join(where, name) for part in (parts if parts is not None else [root])
             for where, _, names in sorted(os.walk(part)) for name in sorted(names)]
    return file_fingerprint(root, files)
