"""Run a function in a world of N local processes (gloo on CPU), torchrun-style.

    from multiproc import run_world          # tests/ is on sys.path under pytest
    results = run_world(check_everything, 4, "some-arg", timeout_s=120, flag=True)

``run_world`` spawns ``world_size`` processes (spawn context), sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a free port) and
``OMP_NUM_THREADS=1`` in each, calls ``fn(*args, **kwargs)`` there and returns the return values
in rank order.  ``fn`` must be a module-level function (it is pickled by name); return values
must be picklable (tensors are fine: they come back by value).  ``fn`` typically starts with
``adm_megatron.parallel.initialize_parallel(...)``; a process group left open is destroyed after
``fn`` returns.

A rank that raises makes ``run_world`` kill the others and raise :class:`WorldError` with that
rank's traceback text; a world that has not finished after ``timeout_s`` is killed and
:class:`WorldTimeout` names the ranks that were still running.

Each spawned process imports torch and megatron-core afresh (about 5 s on 2 cores), so launch one
world per layout and run many checks inside it.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["WorldError", "WorldTimeout", "free_port", "run_world"]


class WorldError(RuntimeError):
    """A rank of a :func:`run_world` world raised (or died); the message holds its traceback."""


class WorldTimeout(WorldError, TimeoutError):
    """A :func:`run_world` world did not finish in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]  # torchrun-style world, whatever the parent was launched by
    try:
        import torch

        torch.set_num_threads(1)
        value = fn(*args, **kwargs)
        payload = ("ok", pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        payload = ("error", traceback.format_exc())
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    from megatron.core import parallel_state

                    parallel_state.destroy_model_parallel()
                except Exception:  # noqa: BLE001
                    pass
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    results.put((rank, *payload))


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def run_world(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300, **kwargs: Any
) -> list:
    """Run ``fn(*args, **kwargs)`` on ranks 0..world_size-1; return the results in rank order."""
    import torch.multiprocessing as tmp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()

    # children inherit the environment at start: keep their thread pools small from the start
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, args, kwargs, results),
                name=f"run_world-rank{rank}",
                daemon=False,  # ranks may start processes (dist_checkpointing does)
            )
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved

    name = getattr(fn, "__qualname__", repr(fn))
    deadline = time.monotonic() + timeout_s
    done: dict[int, Any] = {}
    try:
        while len(done) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                now = time.monotonic()
                dead = [
                    r for r, p in enumerate(procs) if r not in done and not p.is_alive()
                ]
                if dead:
                    # give a just-exited rank's queued message a moment to arrive
                    try:
                        rank, status, payload = results.get(timeout=2)
                    except queue_mod.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise WorldError(
                            f"{name}: rank(s) {dead} of {world_size} died without a result "
                            f"(exit codes {codes})"
                        ) from None
                elif now > deadline:
                    running = [r for r in range(world_size) if r not in done]
                    raise WorldTimeout(
                        f"{name}: world of {world_size} timed out after {timeout_s:.0f} s; "
                        f"ranks still running: {running} (killed)"
                    ) from None
                else:
                    continue
            if status == "error":
                raise WorldError(f"{name}: rank {rank} of {world_size} raised:\n{payload}")
            done[rank] = pickle.loads(payload)
    finally:
        if len(done) == world_size:
            for p in procs:
                p.join(timeout=30)
        _kill(procs)
        results.close()
    return [done[r] for r in range(world_size)]
