"""``output_dir/starts.jsonl``: one line per start of a run (rank 0), so that a run requeued and
resumed for days says what happened to it: when and where each start ran (host, SLURM job and
restart count), with which command, layout and versions, and from which iteration and checkpoint
it went on. Like NeMo's ``cmd-args.log`` / git-info logs, but one record per start; appended, never
rewritten (a crashed start's line stays: the next one's iteration shows what it lost)."""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone

from adm_megatron.versions import stack_versions

STARTS_FILE = "starts.jsonl"


def start_record(info, start_iteration: int, checkpoint: str | None) -> dict:
    """This start: ``info`` is the process's ``ParallelInfo``; ``checkpoint`` the one it resumed from."""
    return {
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "world_size": info.world_size,
        "layout": {"tensor_parallel": info.tp_size, "context_parallel": info.cp_size, "data_parallel": info.dp_size},
        "start_iteration": start_iteration,
        "resumed_from": checkpoint,
        "versions": stack_versions(),
    }


def record_start(output_dir: str, record: dict) -> None:
    """Append ``record`` to ``output_dir/starts.jsonl`` (one line, flushed before training begins)."""
    with open(os.path.join(output_dir, STARTS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
