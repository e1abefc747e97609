"""How a trainable network's gradients are reduced over data parallel: its megatron-core
``DistributedDataParallelConfig``.

With ``parallel.overlap_grad_reduce`` megatron DDP splits the network's gradient buffer into
buckets of ``parallel.grad_bucket_size`` elements and, from the network's second update on,
launches each bucket's all-reduce (or reduce-scatter, with ``optim.<network>.shard_over_dp``) as an
asynchronous collective from the parameters' backward hooks as soon as the bucket's last gradient
has been accumulated; ``finish_grad_sync`` (called by ``finalize_model_grads``) then only waits.
During a network's first update the hooks only count how many gradients each parameter receives,
and ``finish_grad_sync`` reduces synchronously; later updates dispatch a bucket when its counts
match those (megatron's ``_ParamAndGradBucketGroup.register_grad_ready``).

Why this is sound for the phases of one ADM iteration (``adm_megatron.train.phases``):
- Each network's backward hooks sit on its parameters' gradient accumulators. In a phase that does
  not train a network its parameters are frozen (``requires_grad=False`` around the phase's forward
  and backward) or it runs under ``no_grad`` (the generator's rollout), so no accumulator of it is in
  the graph and its hooks do not fire: no bucket of an idle network is ever counted or dispatched.
- A network trained in a phase gets the same number of gradient contributions per parameter in
  every update of that phase (one call with grad per phase in ADM / DMD / DMD2 / ADP), which is what
  the bucket counting needs; a parameter that receives no gradient is refused with one line by
  ``check_grads_arrived`` after the network's first update (megatron would otherwise stop at a
  bare assertion at the next ``zero_grad_buffer``).
- The phase's gradients are consumed by its optimizer step right after megatron's schedule called
  ``finalize_model_grads`` on the phase's network (and ``PhaseRunner`` on each co-trained network):
  that is the one ``finish_grad_sync`` per update, before the norm and the step read ``main_grad``.
- With several micro-batches per update (``data.global_batch_size``) megatron's schedule runs all
  but the last inside the trained networks' ``no_sync`` (``PhaseRunner`` enters a co-trained
  network's too): their backwards accumulate into ``main_grad`` without counting or dispatching,
  and the last micro-batch's backward counts and dispatches each bucket once its gradients, now
  the whole update's, are complete.

On CPU this needs nothing beyond the CPU shim: megatron's asynchronous path is
``torch.distributed._coalescing_manager(group, async_ops=True)``, which records a bucket group's
collectives and issues them as one ``allreduce_coalesced`` / ``reduce_scatter_single_coalesced``
work (torch 2.13, ``distributed_c10d._coalescing_manager``); gloo implements both, and
``finish_grad_sync`` waits on that work. ``overlap_param_gather`` (the sharded optimizer's
all-gather overlapped with the next forward) is not offered: the updated weights are read outside
any forward of the network (the generator's EMA right after its step, checkpoints, export, the
offloader's copies), each of which would have to wait for the gather first.
"""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallelConfig

from adm_megatron.config import ParallelConfig


class GradSyncError(RuntimeError):
    """The overlapped gradient reduction cannot serve this network; the message is one line."""


def ddp_config(parallel: ParallelConfig, sharded: bool, fp32_grads: bool = False) -> DistributedDataParallelConfig:
    """The DDP config of one trainable network; ``sharded``: its optimizer state is sharded over DP
    (DDP then reduce-scatters and all-gathers its buffers); ``fp32_grads``: its bf16 weights'
    (``model.bf16_params``) gradients are accumulated over micro-batches and reduced over DP in an
    fp32 buffer (``model.grad_reduce_in_fp32``, default true), as Megatron-LM
    (``--accumulate-allreduce-grads-in-fp32``, set for every bf16 run) and NeMo's bf16 mixed
    precision do: a bf16 sum of many micro-batches' or ranks' gradients loses their low bits.
    Otherwise gradients are held in the weights' own dtype (fp32 / fp64 weights: exact either way)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32_grads,
        use_distributed_optimizer=sharded,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        bucket_size=parallel.grad_bucket_size or None,  # None: megatron's default
    )


def check_grads_arrived(ddp_module, network: str) -> None:
    """After the backward of ``network``'s first update with overlap: every trainable parameter
    received a gradient (its bucket could not be dispatched otherwise); one-line GradSyncError."""
    if not ddp_module.ddp_config.overlap_grad_reduce:
        return
    names = {p: n for n, p in ddp_module.module.named_parameters()}
    missing = sorted(names[p] for group in ddp_module.bucket_groups if group.is_first_batch
                     for p in group.params if p not in group.per_param_grad_ready_counts)
    if missing:
        raise GradSyncError(
            f"parallel.overlap_grad_reduce=true: {len(missing)} trainable parameter(s) of the {network} received no "
            f"gradient in its update (first: {missing[0]}); the overlapped reduction dispatches a bucket only once "
            "each of its parameters has one: set parallel.overlap_grad_reduce=false"
        )
