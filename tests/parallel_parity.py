"""One parallel layout after another against the one-process diffusers model, inside a run_world rank
(shared by the CogVideoX and SD3 parallel tests).

Each rank builds diffusers' model from the same directory as the one-process reference, and the
parallel model wrapped in megatron-core's DistributedDataParallel; gradients go through
``finalize_model_grads`` (the DP / CP average, the TP sum of sequence-parallel and q/k-norm
gradients) and sharded ones are all-gathered, then mapped back to diffusers names. Every weight
gradient is checked against the reference in the rank (``assert_grads_match``); the output and input
gradient errors come back as numbers.
"""

from __future__ import annotations

import torch

from tiny_cogvideox import assert_grads_match, rel_err

BATCH = 2


def _cogvideox(hf_dir, size):
    """(diffusers class, builder, mapping to diffusers, heads, latents, loss weight, call)."""
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.convert.cogvideox_mapping import megatron_to_hf
    from adm_megatron.models import CogVideoXArch, build_model_from_hf
    from tiny_cogvideox import make_inputs

    arch = CogVideoXArch.from_pretrained_dir(hf_dir)
    latents, text, timestep, rotary, weight = make_inputs(arch, BATCH, *size)

    def call(model, x, share):
        return model(x, text[share], timestep[share], image_rotary_emb=rotary).sample

    return CogVideoXTransformer3DModel, build_model_from_hf, megatron_to_hf, arch, latents, weight, call


def _sd3(hf_dir, size):
    from diffusers import SD3Transformer2DModel

    from adm_megatron.convert.sd3_mapping import megatron_to_hf
    from adm_megatron.models import SD3Arch, build_model_from_hf
    from tiny_sd3 import make_inputs

    arch = SD3Arch.from_pretrained_dir(hf_dir)
    latents, text, pooled, timestep, weight = make_inputs(arch, BATCH, *size)

    def call(model, x, share):
        return model(x, text[share], pooled[share], timestep[share]).sample

    return SD3Transformer2DModel, build_model_from_hf, megatron_to_hf, arch, latents, weight, call


FAMILIES = {"cogvideox": _cogvideox, "sd3": _sd3}


def check_layouts(family: str, hf_dir: str, layouts, size, tol: float) -> dict:
    """``layouts``: (name, tp, cp, sequence_parallel, recompute); loss = sum(out * weight)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from adm_megatron.models.weights import gather_tensor_parallel
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    reference_cls, build, to_hf, arch, latents, weight, call = FAMILIES[family](hf_dir, size)
    reference = reference_cls.from_pretrained(hf_dir)
    x = latents.clone().requires_grad_(True)
    ref_out = call(reference, x, slice(None))
    (ref_out * weight).sum().backward()
    ref_out, ref_dx = ref_out.detach(), x.grad
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    results = {}
    for name, tp, cp, sp, recompute in layouts:
        info = initialize_parallel(tensor_parallel=tp, context_parallel=cp, seed=7)
        model = build(hf_dir, sequence_parallel=sp, recompute=recompute)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        # data parallel ranks take their own share of the batch
        share = slice(info.dp_rank * BATCH // info.dp_size, (info.dp_rank + 1) * BATCH // info.dp_size)
        x = latents[share].clone().requires_grad_(True)
        out = call(ddp, x, share)
        (out * weight[share]).sum().backward()
        finalize_model_grads([ddp])
        # the input gradient: CP ranks each hold a partial sum (see models/backbone.py)
        dx = x.grad.clone()
        torch.distributed.all_reduce(dx, group=parallel_state.get_context_parallel_group())
        grads = {
            n: gather_tensor_parallel(p.main_grad, p) * info.dp_size  # undo the DP mean
            for n, p in model.named_parameters()
        }
        assert_grads_match(to_hf(grads, arch.num_attention_heads), ref_grads, tol, context=name)
        results[name] = {"out": rel_err(out.detach(), ref_out[share]), "dx": rel_err(dx / cp, ref_dx[share])}
        destroy_parallel()
    return results


def assert_close(results, tol: float) -> None:
    for rank_result in results:
        for layout, errors in rank_result.items():
            for what, err in errors.items():
                assert err <= tol, (layout, what, err)
