"""Output files with the modes the umask gives, as files ``open`` creates get.

safetensors (0.8: it writes through a temporary file) and ``tempfile.mkdtemp`` create owner-only
files and directories (0600 / 0700): an exported generator, ODE pairs or prompt embeddings would be
unreadable to the rest of a cluster group sharing them. Writers call these on what they made
before it is published.
"""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it
    os.umask(mask)
    return mask


def give_umask_mode(path: str) -> None:
    """``path`` (a file or directory) with the mode a fresh one would get from the umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def give_umask_modes(directory: str) -> None:
    """``directory`` and everything under it with the modes the umask gives."""
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            give_umask_mode(os.path.join(root, name))
    give_umask_mode(directory)
