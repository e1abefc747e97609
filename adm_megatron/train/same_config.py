"""Every rank of a launch must run the same config. A config file that differs between nodes (a
copy edited on one of them) or overrides given to some ranks only would have each replica train
(or collect) with its own settings -- another seed, learning rate or method -- and nothing would
say so. :func:`check_same_config` compares the ranks' whole configs once the process group
exists, before anything is built, and stops in one line naming the keys that differ.
"""

from __future__ import annotations

import torch.distributed as dist

from adm_megatron.config import Config, ConfigError, config_to_dict
from adm_megatron.parallel.startup import FailedElsewhere
from adm_megatron.train.resume import flatten_keys

__all__ = ["check_same_config"]

SHOWN = 3  # differing keys named in the message


def check_same_config(config: Config) -> None:
    """Collective over the world (nothing in a world of one): rank 0 raises a one-line
    :class:`ConfigError` when any rank's config differs from its own, the other ranks
    :class:`FailedElsewhere`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, flatten_keys(config_to_dict(config)))
    first = every[0]
    others = [r for r, flat in enumerate(every) if flat != first]
    if not others:
        return
    if dist.get_rank() != 0:
        raise FailedElsewhere("the ranks' configs differ")
    other = every[others[0]]
    keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    shown = ", ".join(f"{k}={first.get(k)!r} on rank 0 but {other.get(k)!r} on rank {others[0]}" for k in keys[:SHOWN])
    more = f" (and {len(keys) - SHOWN} more keys)" if len(keys) > SHOWN else ""
    raise ConfigError(f"the ranks were given different configs: {shown}{more}; rank(s) "
                      f"{', '.join(map(str, others))} differ from rank 0: give every rank the same config file and "
                      "overrides")
