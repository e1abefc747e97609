"""Which kernel computes the local spec's attention core: ``model.attention_backend``.

- ``default``: torch's own dispatch (``F.scaled_dot_product_attention`` without a restriction: the
  first of flash / cuDNN / memory-efficient / math whose constraints the inputs meet), as before this
  key existed; deterministic from one run to the next, hence the default.
- ``flash`` / ``efficient`` / ``cudnn`` / ``math``: that one ``torch.nn.attention.SDPBackend``, run
  under ``torch.nn.attention.sdpa_kernel`` (an error, not a silent fallback, if it cannot serve a call).
- ``auto``: the fastest of the SDPA backends that serve the call on this device (math only where no
  fused kernel does), timed once per process and call shape (forward + backward on copies of the
  first call's tensors; ``choose``) and cached; the choice is logged and kept in ``auto_choices()`` for the bench's JSON. Processes
  time on their own, so two runs (or a resumed run) may pick different kernels: their results then
  differ by rounding.
- ``te``: Transformer Engine's ``DotProductAttention`` (``models.te_core_attention``); it needs the
  TE spec (``model.impl`` te, or auto where TE imports), whose core it is. The SDPA names apply to
  the local spec's core only; with the TE spec ``default`` and ``auto`` leave the choice to TE.

``check_backend`` refuses, in one line and before any model is built, a backend this machine or
install cannot run (probed with a tiny call of the run's dtype and head size).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from adm_megatron.config import CHOICES

logger = logging.getLogger("adm_megatron")

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_BACKENDS = CHOICES["model.attention_backend"]  # default, auto, te and the SDPA names

# ``auto`` times the math kernel only when no fused one serves the call: it materialises the whole
# [b, h, s, s] score matrix -- 35 GiB at CogVideoX-2b's 17,776 tokens, which on an H200 either failed
# or ran (230 ms against cuDNN's 19 ms) and left that much reserved in the caching allocator.
MATH_SKIPPED = "skipped (a fused kernel serves this call; math materialises the whole score matrix)"

_AUTO: dict[tuple, dict] = {}  # call signature -> {"backend", "seconds" per candidate, ...}
# call signature -> backend name, read by ``sdpa``: inside a compiled block (``model.compile``) dynamo
# traces the lookup into a constant, guarded on the signature being in the dict, so the kernel choice
# is part of one graph; the first call of a shape times the candidates eagerly (``choose`` is never
# traced: a graph break there once, then a recompile that finds the choice).
_CHOSEN: dict[tuple, str] = {}


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention over [b, h, s, d] tensors with ``backend`` (``default``, ``auto`` or an SDPA name)."""
    if backend == "default":
        return F.scaled_dot_product_attention(query, key, value)
    if backend == "auto":
        chosen = _CHOSEN.get(_signature(query, key))
        backend = choose(query, key, value) if chosen is None else chosen
    if backend == "math":  # torch 2.13's inductor computed math attention of permuted (strided) inputs that need
        # grad wrongly on the CPU (a 3.5 output difference, NaN gradients; tests/test_compile.py): contiguous
        # copies, small beside the score matrix that math materialises anyway
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        return F.scaled_dot_product_attention(query, key, value)


def _signature(query, key) -> tuple:
    return (query.device.type, query.device.index, query.dtype, tuple(query.shape), tuple(key.shape))


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (and the error, if the backend cannot serve the call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


@torch.compiler.disable
def choose(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The fastest SDPA backend for calls shaped like this one (timed at the first such call)."""
    signature = _signature(query, key)
    cached = _AUTO.get(signature)
    if cached is not None:
        return cached["backend"]
    leaves = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    seconds: dict[str, float | str] = {}
    for name, backend in SDPA_BACKENDS.items():
        if name == "math" and any(isinstance(v, float) for v in seconds.values()):
            seconds[name] = MATH_SKIPPED
            continue
        def run(backend=backend):
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(*leaves).sum().backward()
        try:
            with torch.enable_grad():
                seconds[name] = _time(run, query.device)
        except RuntimeError as err:  # the backend cannot serve this device / dtype / shape
            seconds[name] = f"unavailable ({str(err).splitlines()[0][:80]})"
    timed = {name: s for name, s in seconds.items() if isinstance(s, float)}
    if not timed:
        raise RuntimeError(f"model.attention_backend=auto: no SDPA backend serves attention of shape "
                           f"{tuple(query.shape)} {query.dtype} on {query.device}")
    best = min(timed, key=timed.get)
    _CHOSEN[signature] = best
    _AUTO[signature] = {"backend": best, "device": str(query.device), "dtype": str(query.dtype).replace("torch.", ""),
                        "query_shape": list(query.shape), "key_shape": list(key.shape), "seconds": seconds}
    logger.info("attention_backend=auto: %s for q %s k %s %s on %s (forward + backward: %s)", best,
                tuple(query.shape), tuple(key.shape), query.dtype, query.device,
                ", ".join(f"{n} {s * 1e3:.3g} ms" if isinstance(s, float) else
                          f"{n} {'skipped' if s == MATH_SKIPPED else 'unavailable'}" for n, s in seconds.items()))
    return best


def auto_choices() -> list[dict]:
    """What ``auto`` chose in this process, one entry per call shape (with every candidate's time)."""
    return [dict(choice) for choice in _AUTO.values()]


def forget_auto_choices() -> None:
    """Time again at the next call of each shape (a benchmark records its own run's choices)."""
    _AUTO.clear()
    _CHOSEN.clear()


def probe(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if SDPA ``backend`` runs a small forward + backward here, else why not (one line)."""
    q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with torch.enable_grad(), sdpa_kernel([SDPA_BACKENDS[backend]]):
            F.scaled_dot_product_attention(q, q, q).sum().backward()
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def check_backend(backend: str, spec: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """One-line ValueError for ``backend`` on this machine; ``spec``: 'te' or 'local', the block spec
    the run builds."""
    if backend == "te" and spec != "te":
        raise ValueError("model.attention_backend=te: Transformer Engine's attention comes with the TE spec, and "
                         "this run builds the local one (model.impl=local, or Transformer Engine with CUDA is not "
                         "available here)")
    if backend in SDPA_BACKENDS and spec == "te":
        raise ValueError(f"model.attention_backend={backend}: the SDPA backends apply to the local spec's attention; "
                         "the TE spec runs Transformer Engine's (use te or default, or model.impl=local)")
    if backend in SDPA_BACKENDS:
        why = probe(backend, device, dtype, head_dim)
        if why is not None:
            raise ValueError(f"model.attention_backend={backend}: not available for {dtype} on {device} "
                             f"(head size {head_dim}): {why}")
