"""Hugging Face repo ids (``THUDM/CogVideoX-2b``) where a model directory is expected: the teacher, its
pipeline, a generator to start from, the pixel encoder, ``sample --pipeline``. As diffusers'
``from_pretrained`` takes them, they name the repo's snapshot in the local hub cache (``HF_HUB_CACHE``,
``HF_HOME``): huggingface_hub's own lookup (``snapshot_download(..., local_files_only=True)``), which
also refuses a snapshot it knows to be incomplete. Nothing is downloaded: compute nodes commonly have
no network, and every rank of a run would fetch at once; ``hf download ID`` on a login node fills the
cache first. A value that exists on disk is always a path.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# huggingface_hub's repo id shape ("namespace/name"); anything else is only ever a path
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_repo_id(value: str) -> bool:
    return bool(value) and not os.path.exists(value) and REPO_ID.fullmatch(value) is not None


def cached_snapshot(value: str) -> str | None:
    """The local snapshot directory of repo id ``value``, None when ``value`` is not a repo id or the
    cache does not hold it (complete)."""
    if not _looks_like_repo_id(value):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(value, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def local_dir(value: str, key: str) -> str:
    """``value`` itself, or the cached snapshot it names as a repo id (said once, naming ``key``)."""
    snapshot = cached_snapshot(value)
    if snapshot is None:
        return value
    logger.info("%s=%s: the Hugging Face cache's snapshot %s", key, value, snapshot)
    return snapshot


def not_found_hint(value: str) -> str:
    """What to add to a 'not found' for ``value``: for a relative path, the working directory it was
    looked for in (a batch job's is often not the submitter's); for a repo id, the cache it was looked
    for in -- unless its first part is a directory here, which makes it a path."""
    where = "" if os.path.isabs(value) else f" (relative to the working directory {os.getcwd()})"
    if not _looks_like_repo_id(value) or os.path.isdir(value.split("/")[0]):
        return where
    from huggingface_hub import constants

    return (f"{where}, nor a Hugging Face repo in the local cache {constants.HF_HUB_CACHE} (nothing is downloaded: "
            f"`hf download {value}` where there is network, or set HF_HUB_CACHE)")
