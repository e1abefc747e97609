"""JSON files written whole or not at all: a manifest, a measurement, a plan is first written beside
its destination under a temporary name, then renamed over it (``os.replace`` is atomic on one file
system), so a reader, or a rerun after a crash, never finds half of one; and read back with a
one-line error naming a file that is not a JSON object (a cut or edited copy)."""

from __future__ import annotations

import json
import os


def check_json_destination(path: str, flag: str) -> None:
    """One-line ValueError, before the work whose result goes to ``path``, when it could not be written
    there: a directory, or a folder that does not exist or takes no new file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")


def write_json_atomically(path: str, value: dict, indent: int = 2) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"  # per process: two writers never share the temporary
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; a one-line ValueError naming it when it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
