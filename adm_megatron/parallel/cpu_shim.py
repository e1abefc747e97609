"""Let megatron-core's CPU-capable parts run without CUDA (gloo backend).

megatron-core assumes a GPU in a handful of places that are otherwise device-agnostic: it
allocates communication buffers with ``device=torch.cuda.current_device()``, keeps its RNG
tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``, activation
recompute) on the CUDA generator, and calls ``torch.cuda.synchronize()`` around collectives and
checkpoint saves.  On a CPU-only build each of those raises "Torch not compiled with CUDA
enabled" (or, for ``torch.cuda.manual_seed`` and megatron's ``_set_cuda_rng_state``, is silently
queued forever as a lazy CUDA call), although the surrounding code would run fine on CPU.

:func:`apply_cpu_shim` redirects exactly those calls, and only when
``torch.cuda.is_available()`` is False.  With CUDA present it does nothing.  What it changes:

* ``torch.cuda.current_device()`` returns ``'cpu'``, so megatron's buffers
  (sequence-parallel mappings, ``GlobalMemoryBuffer``, DDP grad buffers, layer weights without
  ``use_cpu_initialization``) are allocated on the CPU.
* "The CUDA generator" becomes the CPU default generator: ``torch.cuda.get_rng_state`` /
  ``set_rng_state`` / ``manual_seed`` and megatron's private ``_get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` (``megatron.core.tensor_parallel.random``) read and write
  ``torch.default_generator``.  CPU tensors draw from that generator, so inside
  ``get_cuda_rng_tracker().fork()`` CPU dropout / init uses the tracker's (per-TP-rank) stream,
  which is what the tracker means on a GPU.  megatron's fork() warns when the CPU state changes
  inside it; with the shim on that is the intended effect, so that one message is filtered.
* ``torch.cuda.synchronize()`` is a no-op (CPU ops are synchronous).
* ``torch.cuda.current_stream()`` returns torch's CPU stream (``torch.cpu.current_stream()``),
  whose ``wait_event`` / ``wait_stream`` / ``record_event`` are no-ops.  Up to megatron-core 0.18
  the DDP grad sync asks for the current stream only with several distributed-optimizer
  instances; from 0.19 ``_ParamAndGradBucketGroup.start_grad_sync`` does on every call (to wait
  for CUDA-graph events), so without this ``finish_grad_sync`` fails on a CPU host.

Everything else about CUDA stays as torch has it (``torch.cuda.is_available()`` stays False, so
code paths that check it keep taking their CPU branch).  The patch is process-wide and idempotent;
it is logged once on the ``adm_megatron`` logger.

Public precedent: Megatron-LM issue #7452 (a ``cpu_only_cuda()`` context manager that patches the
same calls to test tensor / context parallel layers on gloo).  What still does not run on CPU with
the shim (megatron's own optimizers hard-code ``device='cuda'``) is listed in DESIGN.md section 2.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["apply_cpu_shim", "cpu_shim_active"]

logger = logging.getLogger("adm_megatron")

_ACTIVE = False
_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


def cpu_shim_active() -> bool:
    """True once :func:`apply_cpu_shim` has patched this process."""
    return _ACTIVE


def _current_device() -> str:
    return "cpu"


def _synchronize(device=None) -> None:  # noqa: ARG001 - same signature as torch.cuda
    return None


def _current_stream(device=None):  # noqa: ARG001
    return torch.cpu.current_stream()


def _get_rng_state(device="cuda") -> torch.Tensor:  # noqa: ARG001
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device="cuda") -> None:  # noqa: ARG001
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):  # noqa: ARG001
    return torch.default_generator.get_state()


def _megatron_set_cuda_rng_state(new_state, device=-1, graph_safe: bool = False):  # noqa: ARG001
    torch.default_generator.set_state(new_state)


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _FORK_WARNING not in record.getMessage()


def apply_cpu_shim() -> bool:
    """Patch the CUDA calls megatron-core makes so they act on the CPU; no-op with CUDA.

    Returns True when the shim is (now or already) active, False when CUDA is available.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize
    torch.cuda.current_stream = _current_stream
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.random.set_rng_state = _set_rng_state
    torch.cuda.random.manual_seed = _manual_seed

    # megatron's private helpers go through torch.cuda._lazy_call / default_generators, which on a
    # CPU build queue the call (with a formatted stack) forever instead of running it.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _megatron_get_cuda_rng_state
    mcore_random._set_cuda_rng_state = _megatron_set_cuda_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())

    _ACTIVE = True
    logger.info(
        "adm_megatron CPU shim on: no CUDA, so torch.cuda.current_device/synchronize/"
        "current_stream/get_rng_state/set_rng_state/manual_seed are redirected to the CPU for megatron-core (gloo)"
    )
    return True
