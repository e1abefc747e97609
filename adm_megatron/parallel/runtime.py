"""Process groups for adm_megatron: torch.distributed + megatron-core ``parallel_state``.

One call, :func:`initialize_parallel`, turns whatever launched this process into a ready
megatron-core layout (tensor x context x data parallel; pipeline parallel is 1 for now):

* torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
* SLURM ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``;
  the master is the first host of the node list and the port comes from ``MASTER_PORT`` or is
  derived from ``SLURM_JOB_ID``; in a job step only: a batch script is one process),
* a plain process: a world of one on 127.0.0.1 and a free port.

The backend is nccl with CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo without it; in the
latter case the CPU shim (:mod:`adm_megatron.parallel.cpu_shim`) is applied so that megatron-core's
CPU-capable parts run.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from adm_megatron.parallel.cpu_shim import apply_cpu_shim
from adm_megatron.parallel.startup import meet

__all__ = [
    "LaunchEnv",
    "ParallelInfo",
    "destroy_parallel",
    "ensure_parallel",
    "expand_nodelist",
    "get_device",
    "initialize_parallel",
    "launch_env",
    "parallel_info",
    "slurm_batch_shell_tasks",
]

logger = logging.getLogger("adm_megatron")


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the parallel layout (world = tp x cp x dp; pp = 1)."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    cp_size: int
    cp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str

    @property
    def layout(self) -> str:
        return _layout_str(self.world_size, self.tp_size, self.cp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information read from the launcher's environment, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


_INFO: ParallelInfo | None = None


def _layout_str(world_size: int, tp: int, cp: int) -> str:
    dp = world_size // (tp * cp) if tp * cp and world_size % (tp * cp) == 0 else "?"
    return f"world={world_size} (tp={tp}, cp={cp}, dp={dp}, pp=1)"


# --------------------------------------------------------------------------------------------
# Launcher environment


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


def barrier() -> None:
    """A barrier over the world when there is more than one process; nothing otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def data_parallel_mean(values: list[float]) -> list[float]:
    """Each of ``values`` averaged over the data-parallel group (collective over it when it has more
    than one rank; ``values`` themselves otherwise): figures of each rank's share of the global
    batch made figures of the global batch, as Megatron-LM averages the losses it logs."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        summed = summed.cuda()
    dist.all_reduce(summed, group=group)
    return (summed / size).tolist()


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` is set on any rank of ``group`` (None: the world); collective over it when
    it has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def from_rank0(value):
    """Rank 0's ``value`` on every rank (collective over the world when there is more than one
    process; ``value`` itself otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


# --------------------------------------------------------------------------------------------
# Initialization


def _check_layout(world_size: int, tp: int, cp: int) -> None:
    for name, value in (("tensor_parallel", tp), ("context_parallel", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel x context_parallel "
            f"= {tp} x {cp} = {tp * cp}"
        )


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _info_from_state(local_rank: int, device: torch.device, backend: str) -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        backend=backend,
    )


def _megatron_initialized() -> bool:
    if not dist.is_initialized():
        return False
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


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



def initialize_parallel(
    tensor_parallel: int = 1,
    context_parallel: int = 1,
    seed: int | None = 1234,
    backend: str | None = None,
    timeout_s: float = 600,
) -> ParallelInfo:
    """Create the torch process group and megatron-core's TP / CP / DP groups (PP = 1).

    Reads the launcher from the environment (see :func:`launch_env`).  ``backend`` defaults to
    nccl with CUDA and gloo without; without CUDA the CPU shim is applied.  ``seed`` (unless None)
    goes to ``torch.manual_seed`` and ``tensor_parallel.model_parallel_cuda_manual_seed``.

    Called again with the same layout it returns the existing info (and does not re-seed); with a
    different layout it raises ValueError.  A world size not divisible by tp x cp raises
    ValueError before any process group is created.
    """
    global _INFO
    tp, cp = tensor_parallel, context_parallel

    if _INFO is not None or _megatron_initialized():
        current = parallel_info()
        if (current.tp_size, current.cp_size) != (tp, cp):
            raise ValueError(
                f"parallel state already initialized as {current.layout}, "
                f"cannot re-initialize as {_layout_str(current.world_size, tp, cp)}; "
                "call destroy_parallel() first"
            )
        return current

    if dist.is_initialized():  # someone else made the process group; reuse it
        launch = LaunchEnv(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))),
            "",
            0,
            "existing",
        )
    else:
        launch = launch_env()
    _check_layout(launch.world_size, tp, cp)  # before any process group exists

    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA, and torch.cuda.is_available() is False")
    device = _default_device(launch.local_rank)
    if cuda:
        torch.cuda.set_device(device)
    else:
        apply_cpu_shim()

    timeout = datetime.timedelta(seconds=timeout_s)
    created_pg = False
    if not dist.is_initialized():
        store = rendezvous_store(launch, timeout)
        if launch.world_size > 1:  # ranks that failed their start-up checks meet us here first
            meet(store, launch.rank, launch.world_size, timeout_s)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
        created_pg = True
    else:
        backend = dist.get_backend()

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as mcore_tp

    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=1,
            context_parallel_size=cp,
            # megatron makes its groups with timedelta(minutes=...): a fraction keeps timeout_s exact
            distributed_timeout_minutes=timeout_s / 60,
        )
    except Exception:
        if created_pg:
            dist.destroy_process_group()
        raise

    if seed is not None:
        torch.manual_seed(seed)
        mcore_tp.model_parallel_cuda_manual_seed(seed)

    _INFO = _info_from_state(launch.local_rank, device, backend)
    if _INFO.rank == 0:
        logger.info(
            "parallel initialized: %s, backend=%s, device=%s, launcher=%s",
            _INFO.layout,
            backend,
            device,
            launch.source,
        )
    return _INFO


def ensure_parallel(seed: int | None = 1234) -> ParallelInfo:
    """The current info; if nothing is initialized, initialize (a world of one in a plain process)."""
    if _INFO is not None or _megatron_initialized():
        return parallel_info()
    return initialize_parallel(seed=seed)


def parallel_info() -> ParallelInfo:
    """The current :class:`ParallelInfo`; RuntimeError if parallel state is not initialized."""
    global _INFO
    if _INFO is not None:
        return _INFO
    if _megatron_initialized():  # initialized by other code
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        _INFO = _info_from_state(local, _default_device(local), dist.get_backend())
        return _INFO
    raise RuntimeError(
        "adm_megatron parallel state is not initialized: call initialize_parallel() or "
        "ensure_parallel() first"
    )


def destroy_parallel() -> None:
    """Destroy megatron-core's parallel state and the torch process group (safe to call twice)."""
    global _INFO
    _INFO = None
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def get_device() -> torch.device:
    """This rank's device: the initialized one, else ``cuda:LOCAL_RANK`` with CUDA, else cpu."""
    if _INFO is not None:
        return _INFO.device
    launch = launch_env()
    return _default_device(launch.local_rank)

