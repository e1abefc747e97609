"""Parallel runtime: process groups, device choice and the CPU shim for megatron-core."""

from adm_megatron.parallel.cpu_shim import apply_cpu_shim, cpu_shim_active
from adm_megatron.parallel.launch_env import LaunchEnv, expand_nodelist, launch_env, slurm_batch_shell_tasks
from adm_megatron.parallel.runtime import (
    ParallelInfo,
    any_rank,
    barrier,
    data_parallel_mean,
    destroy_parallel,
    ensure_parallel,
    from_rank0,
    get_device,
    initialize_parallel,
    parallel_info,
)
