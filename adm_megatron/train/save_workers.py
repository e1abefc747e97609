"""megatron-core's checkpoint writer processes end with the trainer, even a SIGKILLed one.

``dist_checkpointing.save`` (torch_dist) forks writer processes for every save and hands their
results through a queue served by a ``multiprocessing`` Manager process that it spawns once and
keeps for the life of the trainer. A trainer killed with SIGKILL (an OOM killer, a node agent,
``scancel -s KILL``) runs no finalizer: measured here, the Manager and its resource tracker lived
on, and a writer caught mid-save hung for good on a queue lock. :func:`bind_writer_processes` sets
``PR_SET_PDEATHSIG`` (SIGKILL) in every process this one forks (``os.register_at_fork``) and in a
Manager it starts itself and gives megatron, so the kernel ends them with the trainer; the
resource tracker then sees its last client go and exits too. Forks of forks (an asynchronous
save's process forks megatron's writers) get it as well, bound to their own parent, so a chain
ends from its top. Saves run in the main thread, which
lives as long as the process (the death signal follows the thread that forked).

A stop signal (SIGTERM, SIGUSR1) is the trainer's to handle, but SLURM signals every process of a
step, and ``kill -- -PGID`` or a launcher's shutdown every process of the group: the Manager, with
the default action, died of it, and the stop's own checkpoint then failed on a broken pipe (a rank
alone, so the others waited out ``parallel.timeout_s``). The Manager and the resource tracker that
``multiprocessing`` spawns with it ignore them (the tracker: blocked at its start, a mask it
inherits and keeps); they end with the trainer as above. Forks of the trainer inherit its handlers.
Linux only.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing import resource_tracker
from multiprocessing.managers import SyncManager

from adm_megatron.train.preemption import STOP_SIGNALS

_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None


def _die_with_parent(parent: int | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def _serve_for_the_trainer() -> None:
    """The Manager's initializer: stop signals are the trainer's; it ends with the trainer."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()


def bind_writer_processes() -> None:
    """Idempotent; call before the first save."""
    global _manager
    if _manager is not None or not sys.platform.startswith("linux"):
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forking = [os.getpid()]  # the process that forks, seen by its child (a fork copies it)
    os.register_at_fork(before=lambda: forking.__setitem__(0, os.getpid()),
                        after_in_child=lambda: _die_with_parent(forking[0]))
    manager = SyncManager(ctx=mp.get_context("spawn"))
    # the resource tracker spawned with it keeps the mask (it ignores SIGTERM itself, not SIGUSR1);
    # a signal arriving meanwhile stays pending for the trainer, not lost
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # CPython spawns the tracker with SIGINT / SIGTERM blocked and then *unblocks* them here, so
        # started inside manager.start it left the Manager spawned with them at their default action:
        # a stop to the whole group during a run's first save killed it (EOFError in manager.start)
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        manager.start(initializer=_serve_for_the_trainer)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    filesystem_async._results_queue = manager.Queue()  # the queue megatron would start a Manager for
    _manager = manager
