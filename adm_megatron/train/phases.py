"""The phase scheduler: runs one update of one network (fake score, generator or discriminator).

Each phase's forward and backward go through megatron-core's forward-backward schedule
(``get_forward_backward_func``, no pipeline for now) over the update's micro-batches
(``data.global_batch_size``, ``adm_megatron.data.batch_layout``): it divides each micro-batch's loss
by their number, so the accumulated gradients are those of the mean loss over the rank's rows, runs
all but the last micro-batch inside the trained networks' ``no_sync`` (no reduction, no bucket
dispatch), and then calls ``finalize_model_grads`` (DP / CP average, TP sums for sequence-parallel
and q/k-norm gradients) on that phase's DDP-wrapped network once; with
``parallel.overlap_grad_reduce`` the DP reduction has been started bucket by bucket from the last
micro-batch's backward and is only waited for there (``train.grad_sync``). The phase's metrics are
means over its micro-batches (equal-sized, so the means of the rank's rows) and then over the
data-parallel ranks, so they are the global batch's on every rank whatever the layout (as
Megatron-LM averages the losses it logs); the NaN policy reads each rank's own. What each micro-batch's
loss function returns besides (the generator phase's ODE pair) is kept per micro-batch for the next
phase. A phase may also train further networks with the same loss
(``co_trained``: DMD2's classifier heads learn in its fake-score phase); their gradients are
finalised the same way and each steps its own optimiser. Every other trainable network is frozen
for the phase, so only the phase's own parameters receive gradients and change. Metric keys that
already name a section (``discriminator/...``) are kept; others are prefixed with the phase. The
ADM schedule itself (fake score every iteration, generator and discriminator every ``ttur``-th)
lives in the trainer loop. Before each phase, ``adm_megatron.train.offload`` places the networks'
optimizer states (and weights) that the phase does not update in host memory, and further
``before_phase`` callables (the trainer's per-phase recompute switch) run, as configured.

A non-finite loss on any rank, or a non-finite global gradient norm, is decided the same on every
rank (the loss flag is all-reduced over the world, the norm is already global): the update raises
or is skipped everywhere, as ``train.nan_policy`` says; a phase that trains several networks
(``co_trained``) takes or skips its update whole. Skipped updates are counted (in the
checkpoint too); ``max_skipped_steps`` skipped updates of one network in a row stop the run with
one line.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from adm_megatron.parallel import any_rank, data_parallel_mean
from adm_megatron.parallel.device_scope import cpu_device_scope
from adm_megatron.train.grad_sync import check_grads_arrived
from adm_megatron.train.offload import Offloader
from adm_megatron.train.optimizer import NetworkOptimizer

PHASES = ("fake_score", "generator", "discriminator")


class NonFiniteError(FloatingPointError):
    """A phase produced a NaN / Inf loss or gradient under ``train.nan_policy=error``, or too many
    updates in a row were skipped under ``skip``; the message is one line. ``metrics``: what the
    stopped iteration measured up to the stop (its phases' losses and gradient norms), which the
    trainer logs as that iteration's record."""

    def __init__(self, message: str):
        super().__init__(message)
        self.metrics: dict = {}


@dataclass
class TrainableNetwork:
    module: torch.nn.Module  # megatron DDP wrapper of the network
    optimizer: NetworkOptimizer


@contextlib.contextmanager
def frozen(modules: list[torch.nn.Module]):
    """Parameters of ``modules`` take no gradient inside the block (their flags restored after)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def prefixed(metrics: dict, phase: str) -> dict:
    """``metrics`` keyed ``phase/name``; keys that already name a section (``discriminator/...``) stay."""
    return {k if "/" in k else f"{phase}/{k}": v for k, v in metrics.items()}


def no_sync_all(modules: list[torch.nn.Module]) -> Callable[[], contextlib.AbstractContextManager]:
    """One ``no_sync`` for several DDP-wrapped networks trained by one loss (megatron's schedule
    without a pipeline takes a single context function)."""

    @contextlib.contextmanager
    def no_sync():
        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(module.no_sync())
            yield

    return no_sync


def mean_metrics(per_micro: list[dict]) -> dict:
    """Each metric's mean over an update's (equal-sized) micro-batches and over the data-parallel
    ranks (collective): a figure of the global batch whatever the layout, the same on every rank."""
    keys = list(per_micro[0])
    means = [sum(m[key] for m in per_micro) / len(per_micro) for key in keys]
    return dict(zip(keys, data_parallel_mean(means)))


class PhaseRunner:
    def __init__(self, networks: dict[str, TrainableNetwork], nan_policy: str = "error",
                 max_skipped_steps: int = 10, offload: Offloader | None = None,
                 before_phase: tuple[Callable[[str, tuple], None], ...] = ()):
        unknown = set(networks) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phase(s) {sorted(unknown)}: expected {PHASES}")
        self.networks = networks
        self.nan_policy = nan_policy
        self.max_skipped_steps = max_skipped_steps
        self.offload = offload or Offloader(networks, {}, torch.device("cpu"))
        self.before_phase = (self.offload.before_phase, *before_phase)  # each gets (phase, trained)
        self.skipped_total = 0  # updates skipped in the run
        self.skipped_in_a_row = {name: 0 for name in networks}  # each network's, since its last step
        self.forward_backward = get_forward_backward_func()
        for net in networks.values():
            net.module.config.finalize_model_grads_func = finalize_model_grads

    def run(self, phase: str, loss_fn: Callable[[int], tuple], iteration: int,
            co_trained: tuple[str, ...] = (), microbatches: int = 1) -> tuple[dict, list]:
        """One update of ``phase``'s network (and of ``co_trained`` ones) with
        ``loss_fn(micro) -> (loss, metrics, extra)`` for each micro-batch ``micro`` in
        ``range(microbatches)``, their gradients accumulated.

        Returns the phase's metrics (prefixed with the phase name; means over the micro-batches) and
        ``extra`` of each micro-batch, in order.
        """
        own = self.networks[phase]
        trained = (phase, *co_trained)
        others = [net.module for name, net in self.networks.items() if name not in trained]
        losses, per_micro, extras = [], [], []

        def forward_step(data_iterator, model):
            loss, metrics, extra = loss_fn(next(data_iterator))
            losses.append(loss.detach().item())
            per_micro.append(metrics)
            extras.append(extra)
            # (loss, num_tokens, reported): megatron divides by num_tokens = 1 and the microbatch
            # count, and adds no context-parallel factor (outputs are gathered on every CP rank).
            return loss, lambda out: (out, torch.ones((), dtype=torch.int), {"loss": out.detach()})

        start = time.perf_counter()
        for prepare in self.before_phase:
            prepare(phase, trained)
        for name in trained:
            self.networks[name].module.zero_grad_buffer()
        # every trained network skips its DP reduction until the last micro-batch
        own.module.config.no_sync_func = no_sync_all([self.networks[name].module for name in trained])
        with frozen(others), cpu_device_scope():
            self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(range(microbatches)),
                model=[own.module],
                num_microbatches=microbatches,
                seq_length=1,
                micro_batch_size=1,
                forward_only=False,
            )
            for name in co_trained:  # the schedule finalises the first model's gradients only
                finalize_model_grads([self.networks[name].module])
        for name in trained:
            check_grads_arrived(self.networks[name].module, name)
        loss = sum(losses) / len(losses)  # this rank's
        finite = not any_rank(not all(map(math.isfinite, losses)))  # the same decision on every rank
        reported = mean_metrics([{f"{phase}/loss": value, **prefixed(m, phase)} for value, m in zip(losses, per_micro)])
        metrics = {f"{phase}/loss": reported.pop(f"{phase}/loss")}  # the global batch's
        # every trained network's norm first: one non-finite skips (or stops) the phase's whole update
        nan = float("nan")
        norms = {name: self.networks[name].optimizer.checked_norm() if finite else nan for name in trained}
        try:
            for name in trained:
                metrics.update(self._step(name, loss, finite, norms, iteration, phase))
        except NonFiniteError as stop:
            stop.metrics = {**metrics, **{f"{n}/grad_norm": norms[n] for n in trained},
                            "skipped_steps": self.skipped_total, **reported}
            raise
        metrics["skipped_steps"] = self.skipped_total
        metrics[f"{phase}/seconds"] = time.perf_counter() - start
        metrics.update(reported)
        return metrics, extras

    def _step(self, name: str, loss: float, finite: bool, norms: dict[str, float], iteration: int,
              phase: str) -> dict:
        """Clip and step network ``name``'s optimiser after ``phase``, as ``nan_policy`` says, given
        whether the loss was finite on every rank and the global gradient norms of every network the
        phase trains (NaN where the loss was not finite). Unless all are finite none steps: a phase's
        update (DMD2's fake score and heads) is taken or skipped whole."""
        optimizer = self.networks[name].optimizer
        skip = self.nan_policy == "skip"
        lr = optimizer.lr  # the rate this update uses (the scheduler moves on after the step)
        where = f"iteration {iteration}, phase {phase}"
        if not finite and not skip:
            raise NonFiniteError(f"{where}: loss is {loss} on this rank" if not math.isfinite(loss) else
                                 f"{where}: loss is not finite on another rank (this rank's: {loss:.6g})")
        bad = [n for n, v in norms.items() if not math.isfinite(v)]
        if bad and not skip:
            raise NonFiniteError(f"{where}: {bad[0]} gradient norm is {norms[bad[0]]}")
        norm, stepped = norms[name], False
        if not bad:
            norm, stepped = optimizer.step(skip_if_not_finite=False, norm=norm)
        self._count(name, stepped, where)
        return {f"{name}/grad_norm": norm, f"{name}/lr": lr, f"{name}/skipped": not stepped}

    def _count(self, name: str, stepped: bool, where: str) -> None:
        if stepped:
            self.skipped_in_a_row[name] = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row[name] += 1
        if self.skipped_in_a_row[name] >= self.max_skipped_steps:
            raise NonFiniteError(
                f"{where}: {self.skipped_in_a_row[name]} {name} updates in a row skipped for NaN / Inf "
                f"(train.max_skipped_steps={self.max_skipped_steps}); stopped, the last checkpoint "
                "is left as it was"
            )

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": dict(self.skipped_in_a_row)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.skipped_in_a_row.update({k: int(v) for k, v in state["skipped_in_a_row"].items()})
