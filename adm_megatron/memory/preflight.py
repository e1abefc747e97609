"""The memory check ``train`` runs before it builds anything on a GPU: the run's plan (``plan_run``
with the config's own memory settings, this world size and this card's memory) must fit, or the run
stops with one line naming the peak phase, the planned and the usable GiB and what to change.
``train.memory_check: false`` skips it (the planner's margin is 10% of the card; a run that is known
to fit more tightly can opt out)."""

from __future__ import annotations

import torch

from adm_megatron.config import Config, ConfigError
from adm_megatron.memory.plan import GIB, PlanError


def this_gpu() -> tuple[str, float] | None:
    """(name, memory in GiB) of the GPU this process will use (the first visible one: a node's
    cards are alike), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GIB


def check_run_fits(config: Config, world_size: int, card_gib: float, source: str = "the GPU") -> None:
    """One-line ``ConfigError`` when ``config`` on ``world_size`` cards of ``card_gib`` does not fit."""
    from adm_megatron.memory.run_plan import plan_run

    try:
        plan = plan_run(config, world_size, card_gib=card_gib, device="cuda", pinned_memory=True)
    except PlanError as err:
        raise ConfigError(f"memory plan: {err}") from None
    if not plan.fits:
        raise ConfigError(
            f"memory plan: the {plan.peak_phase} phase needs {plan.peak / GIB:.1f} GiB per GPU, {source} has "
            f"{card_gib:.1f} GiB ({plan.budget / GIB:.1f} usable); shard or offload optimizer states "
            f"(optim.<network>.shard_over_dp / offload), recompute (model.recompute), more tensor / context "
            f"parallelism or a smaller data.batch_size (adm-megatron plan shows each term; "
            f"train.memory_check=false skips this check)"
        )
