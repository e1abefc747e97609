"""The checkpoint writer's Manager (``train/save_workers.py``) outlives stop signals sent to the whole
process group while it starts: torchrun's shutdown and SLURM signal every process of a worker's
group, and a stop landing during a run's first save (when the Manager is started) killed it before
its initializer ignored the signal: every rank ended on an ``EOFError`` in ``manager.start`` and
nothing was saved. The cause: CPython's resource tracker, spawned on the way, unblocks SIGINT /
SIGTERM in the starting thread (``resource_tracker.ensure_running``), so the Manager was spawned
with them unblocked and at their default action."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    from adm_megatron.train import save_workers
    from adm_megatron.train.preemption import STOP_SIGNALS
    from megatron.core.dist_checkpointing.strategies import filesystem_async  # imported before the storm

    stops = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda s, f: stops.append(s))  # the trainer's handler records the stop
    storming = threading.Event()
    storming.set()

    def storm():  # SIGTERM to every process of the group, as a launcher's shutdown sends it
        while storming.is_set():
            os.killpg(0, signal.SIGTERM)
            time.sleep(0.002)

    thread = threading.Thread(target=storm)
    thread.start()
    try:
        save_workers.bind_writer_processes()
    finally:
        storming.clear()
        thread.join()
    queue = filesystem_async._results_queue  # served by the Manager: it must still be alive
    queue.put("saved")
    assert queue.get(timeout=10) == "saved"
    # whatever the storm's timing: the Manager was spawned with the stop signals blocked (its status's
    # SigBlk), the mask the tracker's start had cleared
    status = open(f"/proc/{save_workers._manager._process.pid}/status").read()
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    print("blocked", all(blocked >> (s - 1) & 1 for s in STOP_SIGNALS))
    print("stops", len(stops) > 0)
""")


def test_the_writer_manager_survives_stop_signals_to_its_group_while_it_starts():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("blocked True\nstops True"), proc.stdout
