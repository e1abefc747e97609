"""Process groups for adm_megatron: torch.distributed + megatron-core ``parallel_state``.

One call, :func:`initialize_parallel`, turns whatever launched this process (torchrun, a SLURM
``srun`` step or a plain process: read by :mod:`adm_megatron.parallel.launch_env`) into a ready
megatron-core layout (tensor x context x data parallel; pipeline parallel is 1 for now).

The backend is nccl with CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo without it; in the
latter case the CPU shim (:mod:`adm_megatron.parallel.cpu_shim`) is applied so that megatron-core's
CPU-capable parts run.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adm_megatron.config import ConfigError
from adm_megatron.parallel.cpu_shim import apply_cpu_shim
from adm_megatron.parallel.launch_env import LaunchEnv, launch_env, rendezvous_store
from adm_megatron.parallel.startup import differing_ranks, meet

__all__ = [
    "ParallelInfo",
    "destroy_parallel",
    "ensure_parallel",
    "get_device",
    "initialize_parallel",
    "parallel_info",
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


_INFO: ParallelInfo | None = None


def _layout_str(world_size: int, tp: int, cp: int) -> str:
    dp = world_size // (tp * cp) if tp * cp and world_size % (tp * cp) == 0 else "?"
    return f"world={world_size} (tp={tp}, cp={cp}, dp={dp}, pp=1)"


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
        _agree_on_layout(tp, cp)
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


def _agree_on_layout(tp: int, cp: int) -> None:
    """Collective over the world's process group: every rank asks for the same TP x CP. Ranks that
    differ would each create megatron's groups for their own layout and wait in them until
    ``timeout_s`` ran out (the whole-config comparison, ``train/same_config.py``, comes after the
    groups); rank 0 says which ranks in one line, the others raise :class:`FailedElsewhere`."""
    every, others = differing_ranks((tp, cp), "the ranks asked for different parallel layouts")
    if not others:
        return
    shown = ", ".join(f"rank {r}: {every[r][0]} x {every[r][1]}" for r in others[:3])
    raise ConfigError(f"parallel.tensor_parallel x parallel.context_parallel differ between the ranks: rank 0 "
                      f"{every[0][0]} x {every[0][1]} but {shown}: give every rank the same config file and overrides")


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

