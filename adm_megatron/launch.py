"""``python -m adm_megatron.launch ARGS``: torchrun (``torch.distributed.run``, the same arguments) as
the sbatch scripts start it, with a stop by signal said in one line.

With ``--signals-to-handle`` torchrun passes a signal it gets (SLURM's time-limit warning, a
cancellation) on to its workers, waits for them (they save a checkpoint and exit) and then lets
the ``SignalException`` it stopped on escape its ``main``: a 28-line traceback in the job's log at every
preemption of a run that goes on as planned, which reads as a crash. Here that exception alone is
caught: one line, and the exit status of a process ended by that signal (128 + its number), which
``examples/slurm/preemptible.sh`` reads as a step stopped short (requeued after the time-limit
warning). Everything else -- a worker's failure, a rendezvous error -- is torchrun's own report.

``--shutdown-timeout S`` (how long the workers get between the signal passed on and SIGKILL: the
checkpoint's save) is torchrun's own in torch 2.13; torch 2.11's torchrun refused the flag and
gave the workers a fixed 30 s, so the sbatch scripts' command line failed on older torch clusters.
Here it is taken on every torch: passed on where torchrun has it, else applied as the grace period
of torchrun's process context (``PContext.close``'s default timeout, which its agent uses).
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.api import PContext, SignalException
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.run import get_args_parser, run


def _parse(argv: list[str] | None):
    """torchrun's arguments, ``--shutdown-timeout`` among them whatever torchrun's version."""
    parser = get_args_parser()
    if hasattr(parser.parse_known_args(["--shutdown-timeout", "1", "script"])[0], "shutdown_timeout"):
        return parser.parse_args(argv)  # torchrun's own
    parser.add_argument("--shutdown-timeout", "--shutdown_timeout", type=int,
                        default=os.environ.get("PET_SHUTDOWN_TIMEOUT"),  # as torchrun's own reads it
                        help="seconds the workers get after a signal passed on to them, before SIGKILL")
    args = parser.parse_args(argv)
    if args.shutdown_timeout is not None:
        args.shutdown_timeout = int(args.shutdown_timeout)  # (from the environment: a string)
        if args.shutdown_timeout < 0:
            parser.error(f"--shutdown-timeout {args.shutdown_timeout}: expected seconds >= 0")
        PContext.close.__defaults__ = (None, args.shutdown_timeout)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        record(run)(_parse(argv))
    except SignalException as stop:
        print(f"adm_megatron.launch: stopped by {stop.sigval.name}: it was passed on to the workers, which have "
              "ended (a run saves a checkpoint first: checkpoints/latest names it)", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
