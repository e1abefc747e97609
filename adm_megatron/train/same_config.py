"""Every rank of a launch must run the same config. A config file that differs between nodes (a
copy edited on one of them) or overrides given to some ranks only would have each replica train
(or collect) with its own settings -- another seed, learning rate or method -- and nothing would
say so. :func:`check_same_config` compares the ranks' whole configs once the process group
exists, before anything is built, and stops in one line naming the keys that differ;
:func:`check_same_resume` the checkpoint each rank resolved to go on from.
"""

from __future__ import annotations

from adm_megatron.config import Config, ConfigError, config_to_dict, flatten_keys
from adm_megatron.parallel.startup import differing_ranks

__all__ = ["check_same_config", "check_same_resume"]

SHOWN = 3  # differing keys named in the message


def check_same_resume(checkpoint: str | None, resume: str) -> None:
    """Collective: every rank goes on from the same checkpoint. ``train.resume=RUN`` names a run's
    ``checkpoints/latest``, which each rank reads for itself before the process group exists; a run
    still training moves it, and ranks that read it on either side of a save would each load their
    shards of another checkpoint. One line on rank 0, naming the checkpoint to give instead."""
    every, others = differing_ranks(checkpoint, "the ranks resolved different checkpoints")
    if others:
        raise ConfigError(f"train.resume={resume}: rank 0 resolved {every[0]} but rank {others[0]} "
                          f"{every[others[0]]} (the run there saved in between); nothing was loaded: name one, "
                          f"train.resume={every[0]}")


def check_same_config(config: Config) -> None:
    """Collective over the world (nothing in a world of one): rank 0 raises a one-line
    :class:`ConfigError` when any rank's config differs from its own, the other ranks
    :class:`FailedElsewhere`."""
    every, others = differing_ranks(flatten_keys(config_to_dict(config)), "the ranks' configs differ")
    if not others:
        return
    first = every[0]
    other = every[others[0]]
    keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    shown = ", ".join(f"{k}={first.get(k)!r} on rank 0 but {other.get(k)!r} on rank {others[0]}" for k in keys[:SHOWN])
    more = f" (and {len(keys) - SHOWN} more keys)" if len(keys) > SHOWN else ""
    raise ConfigError(f"the ranks were given different configs: {shown}{more}; rank(s) "
                      f"{', '.join(map(str, others))} differ from rank 0: give every rank the same config file and "
                      "overrides")
