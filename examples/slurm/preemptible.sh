# Sourced by the sbatch scripts in this directory (bash). `run_preemptible CMD ...` runs CMD (the
# training step: srun ...) in the background so that the batch shell can take signals while it
# runs. SLURM sends the batch shell SIGUSR1 shortly before the time limit (--signal=B:USR1@N) and
# SIGTERM when the job is cancelled or preempted; either is forwarded to the step as SIGUSR1, on
# which every rank finishes its iteration, saves a checkpoint and exits with code 75. Once the step
# has ended, a job that got the time-limit warning (USR1) and whose step stopped short of the end
# (exit 75; under adm_megatron.launch, torchrun's, 128 + the signal) requeues itself (scontrol requeue, with #SBATCH --requeue); the next start
# runs the same command and train.resume=auto goes on from that checkpoint. A step that finished the
# run anyway (exit 0: the signal came during its last iterations) is not requeued. A TERM (scancel,
# or preemption, which SLURM requeues by itself) only saves, also when it comes after the time-limit
# warning (a job cancelled while its step saves for the time limit stays cancelled) -- except the
# time limit's own TERM (squeue's reason TimeLimit: a step still saving for the warning, or a job
# without one, has KillWait seconds to end), which requeues as the warning does.

_time_limit_reached() {  # the job is being ended by its time limit (not scancel, not preemption)
    [ "$(squeue -h -j "$SLURM_JOB_ID" -o %r 2>/dev/null)" = TimeLimit ]
}

run_preemptible() {
    local requeue=0 signalled=0 rc=0
    "$@" &
    local step=$!
    trap 'requeue=1; signalled=1; echo "[$(date +%T)] stop signal: forwarding SIGUSR1 to the training step"; kill -USR1 "$step" 2>/dev/null' USR1
    trap 'if _time_limit_reached; then requeue=1; else requeue=0; fi; signalled=1; echo "[$(date +%T)] SIGTERM: forwarding SIGUSR1 to the training step"; kill -USR1 "$step" 2>/dev/null' TERM
    while true; do
        wait "$step"
        rc=$?
        kill -0 "$step" 2>/dev/null || break  # wait was only interrupted by the trap: the step goes on
    done
    trap - USR1 TERM
    case $rc in
        0) echo "[$(date +%T)] training step done" ;;
        75) echo "[$(date +%T)] training step stopped after saving a checkpoint (exit 75)" ;;
        # the launcher (torchrun) ends with 128 + the signal it stopped on, after its workers saved
        *) if [ "$signalled" = 1 ]; then
               echo "[$(date +%T)] training step exited with $rc after a stop signal (checkpoints/latest names what it saved)"
           else
               echo "[$(date +%T)] training step exited with $rc"
           fi ;;
    esac
    if [ "$requeue" = 1 ] && [ "$rc" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "[$(date +%T)] requeueing job $SLURM_JOB_ID to go on from the last checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
