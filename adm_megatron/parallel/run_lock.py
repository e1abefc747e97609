"""One run at a time in an output directory: ``output_dir/.run.lock``, an exclusive ``flock`` that the
launch's first process holds while the run trains.

A second run started into the same ``output_dir`` -- the same sbatch script submitted twice, a
command started again while the first one still runs -- would otherwise train beside the first one,
both appending to ``metrics.jsonl`` and moving ``checkpoints/latest``. It is refused in one line
naming the holder (host, pid, start time), after the process group exists and before any network is
built. The kernel drops a ``flock`` with the process that holds it, however it ends (SIGKILL
included), so the file left behind is harmless and the next start takes it again. A filesystem
without ``flock`` (some NFS mounts) gets a warning and no lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time

from adm_megatron.config import ConfigError
from adm_megatron.parallel.runtime import from_rank0
from adm_megatron.parallel.startup import FailedElsewhere

logger = logging.getLogger("adm_megatron")

LOCK_FILE = ".run.lock"


class RunLock:
    """Collective: take the lock of ``output_dir`` on the first rank (``holder``), or raise a one-line
    ConfigError on every rank when another run holds it or ``output_dir`` cannot be created or written.
    ``release`` (or the process's end) frees it."""

    def __init__(self, output_dir: str, holder: bool, key: str = "output_dir", user: str = "run",
                 shown: str | None = None):
        """``key``: how the command names ``output_dir`` (``--out`` for collect-ode); ``user``: what
        holds it; ``shown``: the directory the refusal names (default ``output_dir``; precompute locks
        the work directory of its ``--out``)."""
        self._file = None
        self._key, self._user, self._shown = key, user, shown
        refusal = self._take(output_dir) if holder else None
        refusal = from_rank0(refusal)
        if refusal is not None:  # said once, by the holder's rank
            raise ConfigError(refusal) if holder else FailedElsewhere(refusal)

    def _take(self, output_dir: str) -> str | None:
        path = os.path.join(output_dir, LOCK_FILE)
        try:
            os.makedirs(output_dir, exist_ok=True)
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        except OSError as err:  # e.g. under /proc, or a read-only mount
            return f"{self._key}={self._shown or output_dir!r}: cannot be created or written ({err})"
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "its holder unknown"
            f.close()
            return (f"{self._key}={self._shown or output_dir!r} is in use by another {self._user} ({holder}); wait for "
                    f"it to end, or use a new {self._key}")
        except OSError as err:  # flock not supported here
            f.close()
            logger.warning("%s: cannot lock (%s); nothing stops a second %s from writing here too", path, err, self._user)
            return None
        f.truncate(0)
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
