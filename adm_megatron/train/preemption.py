"""Stopping for a preemption, and time-based saves, decided the same on every rank.

SIGTERM, SIGUSR1 (SLURM's ``--signal=B:USR1@N``, a scheduler's TERM) or SIGINT (Ctrl-C; a second
one ends the process at once, unsaved, as ``KeyboardInterrupt``) only sets a flag; the
trainer asks :meth:`StopPoll.poll` after each iteration, which all-reduces (MAX) the flag and
"``train.save_interval_minutes`` have passed" over the world, so every rank finishes the same
iteration, saves the same checkpoint and exits with :data:`PREEMPTED_EXIT_CODE`.

Before that handler exists -- the start-up: importing torch and megatron-core, building the
networks, reading the teacher, loading a checkpoint, minutes for a large model --
:func:`stops_end_startup` ends the process on such a signal at once (:class:`StartupStop`; the
command exits with the same code, saying so in one line): there is nothing to save yet, and waiting
for the start-up to finish could outlast the scheduler's grace period. ``adm-megatron train`` enters
it first thing (this module imports nothing heavy for that). Once a stop has come, further stop
signals are ignored, to the process's end (a cancelled SLURM step gets SIGTERM and the batch shell's
SIGUSR1: the second one killed the ending rank). A stop that code swallowed (raised inside a finalizer, whose exceptions
Python only prints) is still pending when training begins, and the first poll stops the run.

Under torchrun a rank whose launcher has ended (torchrun killed by a signal it does not pass on:
a bare ``kill -USR1`` to it, whose default action ends it) is re-parented and would train on with
nobody to report to; it takes that as a stop too (its parent process changed), so the run saves
and every rank exits as above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

logger = logging.getLogger("adm_megatron")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved a checkpoint and stopped; run it again to go on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C at a terminal
# torchrun's agent, whose end leaves this rank with another parent: read as the process starts (this
# module is imported before the start-up, which can take minutes); None without torchrun
LAUNCHER = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
_received: int | None = None  # the first stop signal this process got (start-up or training)
_pending: int | None = None  # a start-up stop not yet acted on (its StartupStop may have been swallowed)
# the training loop's handler (StopPoll) was installed: the start-up is over, and a stop that comes
# once the loop has ended (the run finishing: its export, finished.json) is ignored, not a start-up stop
_training_began = False


def stop_received() -> str | None:
    """The name of the first stop signal this process received, if any."""
    return signal.Signals(_received).name if _received else None


def _record(signum: int) -> None:
    global _received
    _received = _received or signum


class StartupStop(BaseException):
    """A stop signal arrived before training began: nothing trained, nothing to save. A
    ``BaseException``, as ``KeyboardInterrupt``: code that turns what it catches into an error of its
    own (diffusers' lazy importer, our checkpoint-metadata reader) catches ``Exception`` and lets it by."""


def startup_stop_in(error: BaseException) -> StartupStop | None:
    """The :class:`StartupStop` that ``error`` is or was raised from (code that catches everything,
    ``BaseException`` included, and re-raises it as an error of its own wraps the stop), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StartupStop):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def stops_end_startup():
    """Inside the block a stop signal raises :class:`StartupStop` (until :class:`StopPoll` takes the
    signals over for the training loop; one after the loop, its handler put back, is ignored: the run
    is ending on its own), and further ones are ignored; the previous handlers come back after it."""
    global _pending, _received, _training_began

    def stop(signum, frame):
        global _pending
        _record(signum)
        ignore_stop_signals()  # until the block ends
        if _training_began:  # after the training loop (its handler put back): nothing left to stop
            return
        _pending = signum
        raise StartupStop(signal.Signals(signum).name)

    _received = _pending = None  # a command of its own (in one process, as the tests run several)
    _training_began = False
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = None


def ignore_stop_signals() -> None:
    """For a process that is ending after a stop: a further stop signal would kill it mid-exit."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopPoll:
    def __init__(self, save_interval_minutes: float = 0.0):
        self.interval_s = save_interval_minutes * 60
        self.last_save = time.monotonic()
        global _pending, _training_began
        self.signal, _pending = _pending, None  # a start-up stop that did not end the start-up
        _training_began = True
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        self._launcher = LAUNCHER
        self.orphaned = False

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: at once, without the checkpoint
        _record(signum)
        self.signal = self.signal or signum

    def poll(self) -> tuple[bool, bool]:
        """Collective: (stop now, a time-based save is due), agreed by all ranks."""
        import torch
        import torch.distributed as dist

        due = self.interval_s > 0 and time.monotonic() - self.last_save >= self.interval_s
        self.orphaned = self.orphaned or (self._launcher is not None and os.getppid() != self._launcher)
        stopping = self.signal is not None or self.orphaned
        flags = torch.tensor([1.0 if stopping else 0.0, 1.0 if due else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due = bool(flags[0]), bool(flags[1])
        if stop and (not dist.is_initialized() or dist.get_rank() == 0):  # once, not once per rank
            name = (signal.Signals(self.signal).name if self.signal else
                    f"the launcher that started the ranks, pid {self._launcher}, has ended" if self.orphaned else
                    "another rank's signal or ended launcher")
            logger.warning("stop requested (%s): saving a checkpoint, then exiting with %d",
                           name, PREEMPTED_EXIT_CODE)
        return stop, due

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
