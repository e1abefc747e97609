"""``python -m adm_megatron.launch ARGS``: torchrun (``torch.distributed.run``, the same arguments) as
the sbatch scripts start it, with a stop by signal said in one line.

With ``--signals-to-handle`` torchrun passes a signal it gets (SLURM's time-limit warning, a
cancellation) on to its workers, waits for them (they save a checkpoint and exit) and then lets
the ``SignalException`` it stopped on escape its ``main``: a 28-line traceback in the job's log at every
preemption of a run that goes on as planned, which reads as a crash. Here that exception alone is
caught: one line, and the exit status of a process ended by that signal (128 + its number), which
``examples/slurm/preemptible.sh`` reads as a step stopped short (requeued after the time-limit
warning). Everything else -- a worker's failure, a rendezvous error -- is torchrun's own report.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except SignalException as stop:
        print(f"adm_megatron.launch: stopped by {stop.sigval.name}: it was passed on to the workers, which have "
              "ended (a run saves a checkpoint first: checkpoints/latest names it)", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
