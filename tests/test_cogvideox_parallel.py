"""Parallel layouts of the megatron CogVideoX equal the one-process model under gloo: TP=2,
TP=2 + SP, CP=2, DP=2 (2 processes) and TP=2 x CP=2 with and without SP, TP=2 x DP=2 (4 processes).

Each rank builds diffusers' model from the same directory as the one-process reference, and the
parallel model wrapped in megatron-core's DistributedDataParallel; gradients go through
``finalize_model_grads`` (the DP / CP average, the TP sum of sequence-parallel and q/k-norm
gradients) and sharded ones are all-gathered, then mapped back to diffusers names. Tolerance: 1e-5
relative per tensor (outputs, input gradients, every weight gradient).
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_world
from tiny_cogvideox import assert_grads_match, make_inputs, rel_err, save_diffusers_model

TOL = 1e-5
TWO_PROCESS_LAYOUTS = [  # (name, tp, cp, sequence_parallel, recompute)
    ("tp2", 2, 1, False, False),
    ("tp2-sp", 2, 1, True, True),
    ("cp2", 1, 2, False, False),
    ("dp2", 1, 1, False, False),
]
FOUR_PROCESS_LAYOUTS = [
    ("tp2-cp2", 2, 2, False, False),
    ("tp2-cp2-sp", 2, 2, True, False),
    ("tp2-dp2-sp", 2, 1, True, False),
]


def _reference(hf_dir, inputs):
    """diffusers forward / backward over the whole batch; loss = sum(out * weight)."""
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel.from_pretrained(hf_dir)
    latents, text, timestep, rotary, weight = inputs
    latents = latents.clone().requires_grad_(True)
    out = model(latents, text, timestep, image_rotary_emb=rotary).sample
    (out * weight).sum().backward()
    return out.detach(), latents.grad, {n: p.grad for n, p in model.named_parameters()}


def _check_layouts(hf_dir, layouts, size):
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from adm_megatron.convert.cogvideox_mapping import megatron_to_hf
    from adm_megatron.models import build_model_from_hf
    from adm_megatron.models.weights import gather_tensor_parallel
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    from adm_megatron.models import CogVideoXArch

    arch = CogVideoXArch.from_pretrained_dir(hf_dir)
    batch = 2
    inputs = make_inputs(arch, batch, *size)
    ref_out, ref_dx, ref_grads = _reference(hf_dir, inputs)
    results = {}
    for name, tp, cp, sp, recompute in layouts:
        info = initialize_parallel(tensor_parallel=tp, context_parallel=cp, seed=7)
        model = build_model_from_hf(hf_dir, sequence_parallel=sp, recompute=recompute)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        # data parallel ranks take their own share of the batch
        share = slice(info.dp_rank * batch // info.dp_size, (info.dp_rank + 1) * batch // info.dp_size)
        latents, text, timestep, rotary, weight = inputs
        latents = latents[share].clone().requires_grad_(True)
        out = ddp(latents, text[share], timestep[share], image_rotary_emb=rotary).sample
        (out * weight[share]).sum().backward()
        finalize_model_grads([ddp])
        # the input gradient: CP ranks each hold a partial sum (see models/cogvideox.py)
        dx = latents.grad.clone()
        torch.distributed.all_reduce(dx, group=parallel_state.get_context_parallel_group())
        grads = {
            n: gather_tensor_parallel(p.main_grad, p) * info.dp_size  # undo the DP mean
            for n, p in model.named_parameters()
        }
        grads = megatron_to_hf(grads, arch.num_attention_heads)
        assert_grads_match(grads, ref_grads, TOL, context=name)
        results[name] = {
            "out": rel_err(out.detach(), ref_out[share]),
            "dx": rel_err(dx / cp, ref_dx[share]),
        }
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("2b", "5b")}


def _assert_close(results):
    for rank_result in results:
        for layout, errors in rank_result.items():
            for what, err in errors.items():
                assert err <= TOL, (layout, what, err)


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_two_process_layouts_match_one_process(hf_dirs, variant):
    # 3 frames x 4 x 6 latents -> 18 video tokens (+16 text): divisible as CP=2 / SP need
    _assert_close(run_world(_check_layouts, 2, hf_dirs[variant], TWO_PROCESS_LAYOUTS, (3, 4, 12)))


def test_four_process_layouts_match_one_process(hf_dirs):
    _assert_close(run_world(_check_layouts, 4, hf_dirs["5b"], FOUR_PROCESS_LAYOUTS, (2, 8, 8)))
