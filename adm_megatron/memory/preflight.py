"""The memory checks ``train`` runs before it builds anything on a GPU: the run's plan (``plan_run``
with the config's own memory settings, this world size and this card's memory) must fit, or the run
stops with one line naming the peak phase, the planned and the usable GiB and what to change
(``train.memory_check: false`` skips it: the planner's margin is 10% of the card, and a run known
to fit more tightly can opt out); and offload needs host memory that can be pinned. On a CPU
offload moves state to plain host memory (the mechanics the tests check), so neither applies."""

from __future__ import annotations

import logging

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


def check_offload_can_pin(config: Config) -> None:
    """On a GPU, one-line ``ConfigError`` when a network's offload is on and memory cannot be pinned."""
    offloaded = [f"optim.{name}.offload={getattr(config.optim, name).offload}"
                 for name in TRAINABLE
                 if getattr(config.optim, name).offload != "none"]
    if offloaded and this_gpu() is not None and not pinned_memory_works():
        raise ConfigError(f"{', '.join(offloaded)}: offload needs pinned host memory, which this machine cannot "
                          "give (check the locked-memory limit, ulimit -l); set offload: none")


def check_run_fits(config: Config, world_size: int, card_gib: float, source: str = "the GPU") -> None:
    """One-line ``ConfigError`` when ``config`` on ``world_size`` cards of ``card_gib`` does not fit."""
    from adm_megatron.memory.run_plan import plan_run

    try:
        plan = plan_run(config, world_size, card_gib=card_gib, device="cuda", pinned_memory=True)
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
