"""``output_dir/starts.jsonl``: one line per start of a run (rank 0), so that a run requeued and
resumed for days says what happened to it: when and where each start ran (host, SLURM job and
restart count), with which command, layout and versions, and from which iteration and checkpoint
it went on, and the config keys it changed from ``output_dir/config.yaml`` (the first start's, which
resume compares against; only keys that may change between starts can differ: a lengthened run's
``train.max_iterations``, a new layout). Like NeMo's ``cmd-args.log`` / git-info logs, but one record
per start; appended, never rewritten (a crashed start's line stays: the next one's iteration shows
what it lost).

The records also tell a requeue from a new launch (:func:`earlier_rollback`): a start that went back
to an earlier checkpoint of its own run (``train.resume`` naming one inside ``output_dir``) records
its launch -- the SLURM job, else torchrun's rendezvous -- and its restart counts, so that the same
launch started again (SLURM's requeue, torchrun's restart of failed ranks: the same command) goes on
from the run's latest instead of going back each time."""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone

import yaml

from adm_megatron.config import flatten_keys
from adm_megatron.versions import stack_versions

STARTS_FILE = "starts.jsonl"


def launch_identity(env=os.environ) -> str | None:
    """What every start of one launch shares, on every rank: its SLURM job (a requeued job keeps its
    id), else the torchrun rendezvous it joined (run id and master endpoint, which torchrun's restarts
    keep); None for a process started by hand, each start of which is a launch of its own."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{env['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}:{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    return None


def restart_counts(env=os.environ) -> list[int]:
    """How often this launch was started again: SLURM's requeues, then torchrun's restarts."""
    return [int(env.get("SLURM_RESTART_COUNT", "0")), int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))]


def earlier_rollback(output_dir: str, checkpoint_name: str, env=os.environ) -> dict | None:
    """The record of a start of this same launch, restarted since (its restart counts below this
    process's), that went back to ``checkpoint_name``; None when there is none -- a new launch, or one
    started by hand, goes back each time it is asked to. Two starts with equal counts (two ``srun``
    steps of one allocation) are two launches."""
    launch = launch_identity(env)
    path = os.path.join(output_dir, STARTS_FILE)
    if launch is None or not os.path.isfile(path):
        return None
    now = restart_counts(env)
    found = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if (record.get("launch") == launch and record.get("rolled_back_to") == checkpoint_name
                    and record.get("restart_counts", now) < now):
                found = record
    return found


def config_changes(output_dir: str, config: dict) -> dict:
    """``{dotted key: [in config.yaml, now]}`` for the keys this start changed from the run's first."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        before = flatten_keys(yaml.safe_load(f) or {})
    now = flatten_keys(config)
    return {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}


def start_record(info, start_iteration: int, checkpoint: str | None, rolled_back: bool = False,
                 changes: dict | None = None) -> dict:
    """This start: ``info`` is the process's ``ParallelInfo``; ``checkpoint`` the one it resumed from,
    ``rolled_back`` whether that was an earlier checkpoint of the run's own; ``changes`` what
    :func:`config_changes` gives."""
    return {
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "launch": launch_identity(),
        "restart_counts": restart_counts(),
        "world_size": info.world_size,
        "layout": {"tensor_parallel": info.tp_size, "context_parallel": info.cp_size, "data_parallel": info.dp_size},
        "start_iteration": start_iteration,
        "resumed_from": checkpoint,
        "rolled_back_to": os.path.basename(checkpoint) if rolled_back else None,
        "config_changes": changes or {},
        "versions": stack_versions(),
    }


def record_start(output_dir: str, record: dict) -> None:
    """Append ``record`` to ``output_dir/starts.jsonl`` (one line, flushed before training begins)."""
    with open(os.path.join(output_dir, STARTS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
