"""A reader's hold on a training checkpoint, so that the live run writing it does not prune it
mid-read.

A long run's checkpoints are read while it trains: ``adm-megatron export`` of ``RUN`` or an
``iter_N``, ``tools/convert_checkpoint.py megatron-to-hf`` of an ``iter_N/generator``, another run's
``train.resume=PATH``. With ``train.keep_checkpoints`` the run removes old checkpoints after each
save, and a reader still loading one then failed half-way, in a traceback from inside torch's
reader (its shard files gone).

Each checkpoint directory holds an empty file, ``.readers`` (the trainer writes it; a reader or
the pruning creates it in an older one). A reader holds a shared ``flock`` on it
(:class:`CheckpointHold`) from before it checks the checkpoint until it has loaded it; the pruning
takes an exclusive one without waiting (:class:`free_to_remove`) and skips a held checkpoint, which a
later save's pruning removes. The pruning renames a checkpoint while it holds the lock, so a reader
that opened ``.readers`` just before must find it still under the checkpoint's name once it holds
the lock, else the checkpoint is gone: said in one line (:class:`CheckpointGone`). The same line
comes when the checkpoint disappears before the reader comes; when a read fails because it
disappeared where there is no ``flock`` (a Lustre mount without ``-o flock``; NFS and GPFS lock
across nodes) or the reader cannot open ``.readers``; and when, once read, the directory under the
checkpoint's name is not the one the hold took (:meth:`CheckpointHold.check`: a run rewound to an
earlier checkpoint saves that iteration again, replacing it, and a read across that would mix two).
"""

from __future__ import annotations

import errno
import fcntl
import os

from adm_megatron.config import ConfigError

READERS = ".readers"


class CheckpointGone(ConfigError):
    """The checkpoint being read was removed (pruned by the run that writes it)."""


def _gone(ckpt_dir: str) -> CheckpointGone:
    root = os.path.dirname(os.path.abspath(ckpt_dir))
    try:
        with open(os.path.join(root, "latest")) as f:
            latest = f"its run's latest is now {os.path.join(root, f.read().strip())}"
    except OSError:
        latest = "its run holds no checkpoint now"
    return CheckpointGone(
        f"{ckpt_dir}: removed or replaced while it was being read (by the run writing it: its pruning, "
        f"train.keep_checkpoints, or a save of the same iteration after a rewind); nothing was written: {latest}, "
        "read that one or pass the run directory for its latest")


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class CheckpointHold:
    """A shared ``flock`` on ``ckpt_dir/.readers`` while the checkpoint is read (a context manager;
    ``release`` ends it early). ``CheckpointGone`` when the checkpoint is not there (any more), and
    on leaving the block with an error when the checkpoint disappeared meanwhile (no ``flock``)."""

    def __init__(self, ckpt_dir: str):
        self.path = ckpt_dir
        self._dir = _inode(ckpt_dir)
        if self._dir is None:
            raise _gone(ckpt_dir)
        self._fd = self._lock(os.path.join(ckpt_dir, READERS))

    def _lock(self, path: str) -> int | None:
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # a read-only run directory: the trainer's file
            try:
                fd = os.open(path, flags, 0o644)
                break
            except FileNotFoundError:
                if self.gone():
                    raise _gone(self.path) from None
                return None  # read-only, and written before checkpoints had the file: only the checks
            except OSError:
                continue
        else:
            return None  # cannot lock here: only the check on leaving
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # the pruning holds its lock only for a rename
        except OSError:
            os.close(fd)
            return None
        held = os.fstat(fd)
        if _inode(path) != (held.st_dev, held.st_ino):
            os.close(fd)  # renamed away (pruned) between the open and the lock
            raise _gone(self.path)
        return fd

    def gone(self) -> bool:
        return _inode(self.path) != self._dir

    def check(self) -> None:
        """``CheckpointGone`` when the checkpoint is no longer the directory the hold took: called once
        it is read, before anything is written from it. The pruning skips a held checkpoint, but a
        run rewound to an earlier one saves this iteration again, replacing the directory under its
        name, and a read that went on there would mix the two."""
        if self.gone():
            raise _gone(self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CheckpointHold":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.release()
        if error is not None and not isinstance(error, CheckpointGone) and self.gone():
            raise _gone(self.path) from error


class free_to_remove:
    """The pruning's side: ``with free_to_remove(ckpt) as free:`` -- ``free`` is False while a reader
    holds the checkpoint; otherwise no reader can take it until the block ends (rename it inside)."""

    def __init__(self, ckpt_dir: str):
        self._fd = None
        try:
            self._fd = os.open(os.path.join(ckpt_dir, READERS), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.free = True
        except OSError as err:
            self.free = err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)  # no flock here: remove as before

    def __enter__(self) -> bool:
        return self.free

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
