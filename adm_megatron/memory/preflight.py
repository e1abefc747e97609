"""The memory checks ``train`` runs before it builds anything on a GPU: the run's plan (``plan_run``
with the config's own memory settings, this world size and this card's memory) must fit, or the run
stops with one line naming the peak phase, the planned and the usable GiB and what to change
(``train.memory_check: false`` skips it: the planner's margin is 10% of the card, and a run known
to fit more tightly can opt out). So must the plan's host terms of the ranks on this node (offloaded
states, a checkpoint's staging) fit the memory the node gives the job, which would otherwise
OOM-kill the run at its first checkpoint, possibly hours in. And offload needs host memory that
can be pinned. On a CPU offload moves state to plain host memory (the mechanics the tests check),
so none of this applies."""

from __future__ import annotations

import logging
import os
import re

import psutil
import torch

from adm_megatron.config import Config, ConfigError
from adm_megatron.memory.plan import GIB, TRAINABLE, PlanError
from adm_megatron.memory.report import samples_warning

logger = logging.getLogger("adm_megatron")


def this_gpu() -> tuple[str, float] | None:
    """(name, memory in GiB) of the GPU this process will use (the first visible one: a node's
    cards are alike), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GIB


def pinned_memory_works() -> bool:
    """Whether the host can pin memory for CUDA copies (a container's locked-memory limit can
    forbid it); offload needs it on a GPU."""
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError:
        return False
    return True


def _cgroup_limit_files() -> list[str]:
    """The memory-limit files of this process's cgroups (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
        elif "memory" in controllers.split(","):
            files.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes")
    return files


def host_memory_gib() -> float:
    """The memory this node gives the job: its physical memory, or its cgroup's limit where lower
    (SLURM's ``--mem`` through its cgroup plugin, a container's limit; psutil does not read those)."""
    limit = psutil.virtual_memory().total
    for path in _cgroup_limit_files():
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            limit = min(limit, int(value))
    return limit / GIB


def ranks_on_this_node(world_size: int) -> int:
    """How many of the run's ranks share this node's host memory: torchrun's ``LOCAL_WORLD_SIZE``,
    else SLURM's tasks on this node, else one per visible GPU; at most the world."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return min(world_size, int(env[key]))
    tasks = re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", ""))  # e.g. 8(x2)
    if tasks:
        return min(world_size, int(tasks.group()))
    return min(world_size, max(1, torch.cuda.device_count()))


def check_offload_can_pin(config: Config) -> None:
    """On a GPU, one-line ``ConfigError`` when a network's offload is on and memory cannot be pinned."""
    offloaded = [f"optim.{name}.offload={getattr(config.optim, name).offload}"
                 for name in TRAINABLE
                 if getattr(config.optim, name).offload != "none"]
    if offloaded and this_gpu() is not None and not pinned_memory_works():
        raise ConfigError(f"{', '.join(offloaded)}: offload needs pinned host memory, which this machine cannot "
                          "give (check the locked-memory limit, ulimit -l); set offload: none")


def check_run_fits(config: Config, world_size: int, card_gib: float, source: str = "the GPU",
                   host_gib: float = 0.0, ranks_per_node: int = 1) -> None:
    """One-line ``ConfigError`` when ``config`` on ``world_size`` cards of ``card_gib`` does not fit,
    or (``host_gib`` > 0) when its host terms for ``ranks_per_node`` ranks do not fit ``host_gib``."""
    from adm_megatron.memory.run_plan import plan_run

    try:
        plan = plan_run(config, world_size, card_gib=card_gib, device="cuda", pinned_memory=True,
                        gpus_per_node=ranks_per_node, host_gib=host_gib)
    except PlanError as err:
        raise ConfigError(f"memory plan: {err}") from None
    if not plan.samples_fit and plan.fits:
        logger.warning("memory plan: %s", samples_warning(plan))
    if not plan.fits:
        raise ConfigError(
            f"memory plan: the {plan.peak_phase} phase needs {plan.peak / GIB:.1f} GiB per GPU, {source} has "
            f"{card_gib:.1f} GiB ({plan.budget / GIB:.1f} usable); shard or offload optimizer states "
            f"(optim.<network>.shard_over_dp / offload), recompute (model.recompute), more tensor / context "
            f"parallelism or a smaller data.batch_size with data.global_batch_size kept by gradient accumulation "
            f"(adm-megatron plan shows each term; "
            f"train.memory_check=false skips this check)"
        )
    if not plan.host_fits:
        host = plan.host
        raise ConfigError(
            f"memory plan: host memory: up to {plan.host_per_node / GIB:.1f} GiB for the {plan.ranks_per_node} "
            f"rank(s) on this node (each {(host['offloaded optimizer states'] + host['offloaded weights']) / GIB:.1f} "
            f"GiB offloaded, {host['checkpoint staging'] / GIB:.1f} GiB staging a checkpoint), this node gives the job "
            f"{host_gib:.1f} GiB ({plan.host_budget / GIB:.1f} usable); shard the optimizer states over data parallel "
            f"(optim.<network>.shard_over_dp), offload less, or ask for more memory (SLURM --mem) "
            f"(train.memory_check=false skips this check)"
        )
