"""The launcher's environment, before any process group exists: which rank this process is, of how
many, and where the launch's rendezvous store lives.

torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), a SLURM ``srun``
step (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``) or a plain process
(a world of one). Both the start-up agreement (:mod:`adm_megatron.parallel.startup`) and the process
groups (:mod:`adm_megatron.parallel.runtime`) read it.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch.distributed as dist

__all__ = ["LaunchEnv", "expand_nodelist", "launch_env", "rendezvous_store", "slurm_batch_shell_tasks"]


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information read from the launcher's environment, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


_HOST_RANGE = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            start, stop = int(lo), int(hi)
            if stop < start:
                raise ValueError(f"bad SLURM host range {item!r}")
            out.extend(str(i).zfill(width) for i in range(start, stop + 1))
        else:
            out.append(item)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"node[01-03,07],gpu5"`` -> ``[node01, node02, node03, node07, gpu5]``.

    Handles zero padding and several bracket groups in one name (``r[1-2]-n[1-2]``); no scontrol.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        expansions = [""]
        pos = 0
        for m in _HOST_RANGE.finditer(part):
            prefix = part[pos : m.start()]
            expansions = [e + prefix + r for e in expansions for r in _expand_range_list(m.group(1))]
            pos = m.end()
        tail = part[pos:]
        if "[" in tail or "]" in tail:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
        hosts.extend(e + tail for e in expansions)
    return hosts


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """Whether srun started this process as a task of a job step. A job's batch script has
    ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS`` too, but no step id: those describe the
    allocation, not a launch of that many processes."""
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env


def slurm_batch_shell_tasks(environ: Mapping[str, str] | None = None) -> int:
    """The task count of the SLURM job whose batch script (not an srun step) runs this process, when
    that is more than one; 0 otherwise. Such a process is one, however many tasks the job asked
    for (a multi-process command there waits for ranks nobody starts: run it with srun)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or _in_slurm_step(env):
        return 0
    try:
        tasks = int(env.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 0
    return tasks if tasks > 1 else 0


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank / world / master from torchrun or SLURM variables; a world of one otherwise.

    torchrun variables win over SLURM ones (torchrun inside an srun step sets both). SLURM's are
    read in an srun step only (a batch script is one process: :func:`slurm_batch_shell_tasks`). Under SLURM,
    MASTER_ADDR / MASTER_PORT from the environment are used when set; otherwise the first host of
    SLURM_JOB_NODELIST (or SLURM_NODELIST) and port 15000 + SLURM_JOB_ID % 10000.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        return LaunchEnv(rank, world, local, addr, port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _in_slurm_step(env):
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM launch without MASTER_ADDR or SLURM_JOB_NODELIST")
            addr = expand_nodelist(nodelist)[0]
        if env.get("MASTER_PORT"):
            port = _env_int(env, "MASTER_PORT")
        elif env.get("SLURM_JOB_ID"):
            port = 15000 + _env_int(env, "SLURM_JOB_ID") % 10000
        else:
            port = 29500
        return LaunchEnv(rank, world, local, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


# The rendezvous store outlives destroy_parallel(): re-initializing in the same processes (a new
# layout) reuses it under a fresh key prefix.  A new store on the same MASTER_PORT would race: a
# fast rank can reconnect to the old server before rank 0 has torn it down and read stale keys.
_STORE: tuple[tuple, dist.Store] | None = None
_GENERATION = 0


def rendezvous_store(launch: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The launch's rendezvous store under this initialization's key prefix (a process's n-th
    call gets the n-th prefix, the same on every rank)."""
    global _STORE, _GENERATION
    key = (launch.source, launch.master_addr, launch.master_port, launch.rank, launch.world_size)
    if _STORE is None or _STORE[0] != key:
        if launch.source == "torchrun":
            # env:// reuses torchrun's agent store where there is one (TORCHELASTIC_USE_AGENT_STORE)
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            url = "env://"
        else:
            port = launch.master_port or _free_port(launch.master_addr)
            url = f"tcp://{launch.master_addr}:{port}"
        store, _, _ = next(
            dist.rendezvous(url, launch.rank, launch.world_size, timeout=timeout)
        )
        _STORE = (key, store)
        _GENERATION = 0
    _GENERATION += 1
    store = _STORE[1]
    store.set_timeout(timeout)
    return dist.PrefixStore(f"adm_megatron/{_GENERATION}", store)
