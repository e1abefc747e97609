"""Start-up failures of a multi-process launch, agreed over the launch's rendezvous store.

Each rank checks its config and inputs on its own before any process group exists. A failure that
only some ranks see (a path missing on one node, a config file that differs between nodes) used
to leave the ranks that passed waiting in the process group's rendezvous for the ones that had
exited: for ``parallel.timeout_s`` (600 s) on another node, then a store-timeout traceback. Now
every rank meets once on the rendezvous store, before the process group is made
(:func:`exchange`): a rank that failed posts its one-line message (:func:`agree_on_failure`), a
rank that passed posts nothing (``initialize_parallel``), and each learns every rank's outcome.
The ranks that passed then stop with :class:`FailedElsewhere`, which prints nothing; each distinct
message is printed once, by the lowest rank that hit it, naming the ranks when not all did.

Only the store is used (no process group, no collective backend), so a failing rank needs
neither a GPU nor a working layout to take part.
"""

from __future__ import annotations

import datetime
import socket
import time

import torch.distributed as dist

from adm_megatron.config import ConfigError
from adm_megatron.parallel.launch_env import launch_env, rendezvous_store

__all__ = ["FailedElsewhere", "agree_on_failure", "confirm_start", "exchange", "meet"]

_PREFIX = "startup"
_POLL_S = 0.5  # the longest pause between two looks at the store (see _wait)
_MET = False  # this process has taken part in an exchange: a failure after it is said by its own rank


class FailedElsewhere(ConfigError):
    """Other ranks of this launch failed their start-up checks (they print why); this one passed."""


def exchange(store, rank: int, world_size: int, message: str | None, timeout_s: float) -> list[tuple[int, str, str]]:
    """Post this rank's start-up outcome (``message``: its one-line error, or None) and read every
    rank's; returns the failures as (rank, host, message), in rank order. Every rank returns only
    once all have read (the store may live in one of them). Waiting longer than ``timeout_s`` for
    a rank raises :class:`ConfigError` naming the ranks that did not come."""
    global _MET
    _MET = True
    store.set(f"{_PREFIX}/{rank}", f"{socket.gethostname()}\n{message or ''}")
    store.add(f"{_PREFIX}/posted", 1)
    _wait(store, f"{_PREFIX}/posted", [f"{_PREFIX}/{r}" for r in range(world_size)], world_size, timeout_s)
    failures = []
    for r in range(world_size):
        host, _, text = store.get(f"{_PREFIX}/{r}").decode().partition("\n")
        if text:
            failures.append((r, host, text))
    store.set(f"{_PREFIX}/read/{rank}", "1")
    store.add(f"{_PREFIX}/read_count", 1)
    _wait(store, f"{_PREFIX}/read_count", [f"{_PREFIX}/read/{r}" for r in range(world_size)], world_size,
          timeout_s)
    return failures


def _wait(store, counter: str, keys: list[str], world_size: int, timeout_s: float) -> None:
    """Until ``counter`` (each rank adds 1 to it once its key is set) reaches ``world_size``: one small
    store request per look, with pauses from 10 ms to :data:`_POLL_S`. A pause is a Python sleep, so a
    stop signal's handler runs at once; the store's own wait is C++, where none runs (a rank told to
    stop sat there until ``timeout_s``), and waited in short slices it logged two c10d warnings per
    slice on every waiting rank. ``keys`` name the ranks that did not come."""
    deadline = time.monotonic() + timeout_s
    pause = 0.01
    while True:
        try:
            if store.add(counter, 0) >= world_size:
                return
        except Exception:  # noqa: BLE001 - the store's server gone with a rank that exited
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(2 * pause, _POLL_S)
    missing = [k.rsplit("/", 1)[1] for k in keys if not _has(store, k)]
    raise ConfigError(
        f"rank(s) {', '.join(missing) or '?'} of {world_size} did not start within parallel.timeout_s="
        f"{timeout_s:g} s (see their own output: a rank that stopped before its start, or a launch that "
        "does not start every rank)") from None


def _has(store, key: str) -> bool:
    try:
        return store.check([key])
    except Exception:  # the store itself is gone
        return False


def to_print(failures: list[tuple[int, str, str]], rank: int, world_size: int) -> list[str]:
    """The lines this rank prints: each distinct message once, by the lowest rank with it, naming
    the ranks (and hosts) when not every rank hit it."""
    lines = []
    for text in dict.fromkeys(m for _, _, m in failures):
        where = [(r, h) for r, h, m in failures if m == text]
        if where[0][0] != rank:
            continue
        if len(where) < world_size:
            hosts = sorted({h for _, h in where})
            ranks = ", ".join(str(r) for r, _ in where)
            text += f" (on rank {ranks} of {world_size}, host {', '.join(hosts)}; the other ranks passed this check)"
        lines.append(text)
    return lines


def _launch_to_meet():
    """This launch when its ranks are still to meet (more than one, no process group yet, no meeting
    taken part in), else None; ValueError from ``launch_env`` for a launch it cannot read."""
    import torch.distributed as dist

    launch = launch_env()
    return None if launch.world_size == 1 or dist.is_initialized() or _MET else launch


def agree_on_failure(message: str, timeout_s: float = 600) -> list[str]:
    """On a rank that failed before any process group exists: meet the other ranks (see the module
    docstring) and return the lines this rank prints (``[message]`` in a world of one, or when the
    others cannot be met: then they stop on their own timeout)."""
    try:
        launch = _launch_to_meet()
    except ValueError:
        return [message]
    if launch is None:  # a world of one, or after the start: each rank says its own
        return [message]
    try:
        store = rendezvous_store(launch, datetime.timedelta(seconds=timeout_s))
        failures = exchange(store, launch.rank, launch.world_size, message, timeout_s)
    except Exception:  # noqa: BLE001 - no meeting (a rank gone, a store unreachable): say it here
        return [message]
    return to_print(failures, launch.rank, launch.world_size)


def confirm_start(timeout_s: float = 600) -> None:
    """On a rank that passed its checks but makes no process group (nothing left to do: a finished
    run or collection): meet the ranks that failed theirs, which wait for every rank, and raise
    :class:`FailedElsewhere` if any did. Nothing in a world of one or once a group exists."""
    launch = _launch_to_meet()
    if launch is None:
        return
    meet(rendezvous_store(launch, datetime.timedelta(seconds=timeout_s)), launch.rank, launch.world_size, timeout_s)


def meet(store, rank: int, world_size: int, timeout_s: float) -> None:
    """On a rank that passed its start-up checks: :func:`exchange`, and raise
    :class:`FailedElsewhere` if any rank failed its own."""
    failures = exchange(store, rank, world_size, None, timeout_s)
    if failures:
        raise FailedElsewhere(f"rank(s) {', '.join(str(r) for r, _, _ in failures)} of {world_size} failed their "
                              "start-up checks")


def differing_ranks(value, elsewhere: str) -> tuple[list, list[int]]:
    """Collective: every rank's ``value`` and the ranks whose value differs from rank 0's (none in a
    world of one); a rank other than 0 raises :class:`FailedElsewhere` (``elsewhere``) when any differs,
    rank 0 says what."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value], []
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    others = [r for r, other in enumerate(every) if other != every[0]]
    if others and dist.get_rank() != 0:
        raise FailedElsewhere(elsewhere)
    return every, others
