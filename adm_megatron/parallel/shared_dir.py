"""An output directory every rank must see as the same one (a run's ``output_dir``, a collection's
or a sample set's ``--out``): each rank writes its share of the checkpoints, shards or samples
there, and rank 0 publishes them (``checkpoints/latest``, the manifest). On a directory that is
local to each node (``/tmp``, a node's scratch disk) a multi-node run used to finish "complete"
with the other nodes' shares on their own disks: a ``latest`` checkpoint that cannot be loaded.
:func:`check_shared_dir` finds that before anything is built: rank 0 writes a fresh marker file
there and every rank looks for it.
"""

from __future__ import annotations

import os
import socket
import uuid

import torch.distributed as dist

from adm_megatron.config import ConfigError
from adm_megatron.parallel.startup import FailedElsewhere

__all__ = ["check_shared_dir"]


def check_shared_dir(path: str, what: str) -> None:
    """Collective over the world (nothing in a world of one): ``path`` (made by rank 0 if missing)
    must be one directory on every rank. Otherwise rank 0 raises a one-line :class:`ConfigError`
    naming ``what``, the ranks and hosts that do not see it, and the other ranks
    :class:`FailedElsewhere`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    marker = os.path.join(path, f".shared-check-{box[0]}")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(marker, "w"):
            pass
    dist.barrier()
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.path.exists(marker), socket.gethostname()))
    if rank == 0:
        os.remove(marker)
    blind = [(r, host) for r, (found, host) in enumerate(seen) if not found]
    if not blind:
        return
    if rank != 0:
        raise FailedElsewhere(f"{what}={path!r} is not shared with rank 0")
    ranks = ", ".join(str(r) for r, _ in blind)
    hosts = ", ".join(sorted({host for _, host in blind}))
    raise ConfigError(f"{what}={path!r}: not one directory on every rank: rank(s) {ranks} (host {hosts}) do not see "
                      f"the files rank 0 (host {seen[0][1]}) writes there; use a directory on a filesystem every "
                      "node mounts")
