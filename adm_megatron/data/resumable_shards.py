"""A text-embedding shard writer that a killed precompute resumes (``tools/precompute_text_embeddings.py``).

Encoding a large prompt set with T5-XXL takes hours, on a queue that preempts: a precompute killed
half-way (SIGTERM, SIGKILL, a node lost) started again from its first prompt. This writer works in
one fixed directory beside ``--out``, ``.NAME.partial/``, whatever the host and process, holding
``progress.json`` -- the settings that decide every byte of the output (``settings``: the prompts'
SHA-256, the encoder and its weights' fingerprint, token length, dtype, batch and shard size, device
type) and the shards written so far -- rewritten after each shard, each shard renamed into place
whole. The same command started again continues after the last recorded shard: the tool encodes the
same chunks as an uninterrupted run (shard boundaries are chunk boundaries), so the result is the
same bit for bit; other settings are refused in one line naming the first that differs, before the
encoder loads. A precompute of the same ``--out`` still running (on any host) holds the work
directory's lock (``parallel/run_lock.py``'s ``flock``) and a second one is refused. ``close`` moves the
directory into place as :class:`EmbeddingShardWriter` does (``--out`` complete or untouched); an
exception keeps it, for the next start to resume.
"""

from __future__ import annotations

import os

from adm_megatron.data.safetensors_rows import check_safetensors_file
from adm_megatron.data.text_embeddings import EmbeddingShardWriter, remove_killed_writers
from adm_megatron.json_file import read_json_object, write_json_atomically
from adm_megatron.parallel.run_lock import LOCK_FILE, RunLock

PROGRESS_FILE = "progress.json"


def work_dir_of(out_dir: str) -> str:
    """The fixed work directory of ``out_dir``'s precompute."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def lock_work_dir(out_dir: str) -> RunLock:
    """Take the lock of ``out_dir``'s work directory (made if need be) for this process: one precompute
    of ``out_dir`` at a time. A one-line ConfigError names the holder when another one runs."""
    return RunLock(work_dir_of(out_dir), True, "--out", "precompute", shown=os.path.abspath(out_dir))


def check_resumable(out_dir: str, settings: dict) -> list[dict]:
    """The shards (``{"file", "rows"}``) an unfinished precompute of ``out_dir`` with these
    ``settings`` has recorded ([]: none to resume); a one-line ValueError when it was started with
    other settings."""
    progress_file = os.path.join(work_dir_of(out_dir), PROGRESS_FILE)
    if not os.path.isfile(progress_file):
        return []
    progress = read_json_object(progress_file)
    saved = progress.get("settings", {})
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            raise ValueError(
                f"--out {out_dir}: an unfinished precompute in {work_dir_of(out_dir)} has {key}={saved.get(key)!r}, this "
                f"one {settings.get(key)!r}: run it again as it was to finish it, or remove that directory to start anew")
    return progress["shards"]


class ResumableShardWriter(EmbeddingShardWriter):
    """``lock``: :func:`lock_work_dir`'s, taken by the caller (before minutes of loading an encoder);
    released when the writer closes or aborts."""

    def __init__(self, out_dir: str, negative, settings: dict, lock: RunLock, shard_size: int = 256,
                 encoder: str = "", overwrite: bool = False, negative_pooled=None):
        self.settings = settings
        self._lock = lock
        super().__init__(out_dir, negative, shard_size, encoder, overwrite, negative_pooled)

    @property
    def done(self) -> int:
        """Prompts already in shards (from an earlier start, and this one's)."""
        return sum(shard["rows"] for shard in self._shards)

    def _work_dir(self) -> str:
        path = work_dir_of(self.out_dir)
        remove_killed_writers(self.out_dir)  # temporary directories of writers from before this one
        self._shards = check_resumable(self.out_dir, self.settings)
        for i, shard in enumerate(self._shards):  # whole (renamed into place), unless cut since: written again
            try:
                check_safetensors_file(os.path.join(path, shard["file"]))
            except (OSError, ValueError):
                self._shards = self._shards[:i]
                break
        for name in os.listdir(path):  # a shard being written when the process died
            if name.endswith(".tmp"):
                os.remove(os.path.join(path, name))
        self._shard_written()
        return path

    def _shard_written(self) -> None:
        write_json_atomically(os.path.join(work_dir_of(self.out_dir), PROGRESS_FILE),
                              {"settings": self.settings, "shards": self._shards})

    def skip(self, prompts: list[str]) -> None:
        """The prompts of the shards an earlier start wrote (``done`` of them), for the index."""
        if len(prompts) != self.done or self._prompts:
            raise ValueError(f"skip: expected the {self.done} prompts written before, first, got {len(prompts)}")
        self._prompts = list(prompts)

    def _move_into_place(self) -> None:
        for name in (PROGRESS_FILE, LOCK_FILE):
            os.remove(os.path.join(self._tmp, name))
        super()._move_into_place()
        self._lock.release()

    def abort(self) -> None:
        """Keep the work directory: the next start resumes from its shards."""
        self._lock.release()

