"""Parallel runtime: process groups, device choice and the CPU shim for megatron-core."""

from adm_megatron.parallel.cpu_shim import apply_cpu_shim, cpu_shim_active
from adm_megatron.parallel.runtime import (
    LaunchEnv,
    ParallelInfo,
    any_rank,
    barrier,
    data_parallel_mean,
    destroy_parallel,
    ensure_parallel,
    expand_nodelist,
    from_rank0,
    get_device,
    initialize_parallel,
    launch_env,
    parallel_info,
    slurm_batch_shell_tasks,
)
