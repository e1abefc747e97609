"""A LoRA generator at TP = 2 and at TP = 2 with sequence parallelism equals one process under gloo:
outputs, the input gradient and every adapter gradient (gathered over TP) within 1e-5 relative;
and its megatron checkpoint saved at TP = 2 (adapters sharded like their layers) loads back at
TP = 1 with the same whole adapters.

One world of 2 processes runs the three layouts in turn: first TP = 1 (each rank a whole model on
the whole batch, no DDP: the one-process reference), then TP = 2 and TP = 2 + SP wrapped in
megatron-core DDP with ``finalize_model_grads`` (which sums the ``sequence_parallel``-tagged
adapter gradients over TP). Every layout loads the same whole adapters (non-zero B, so A's
gradient is not zero) into its shards.

CogVideoX adapts its default targets; SD3 (the SD3-Medium style and the SD3.5-Medium style with
dual attention) the SD3-Medium example's, on both streams. SD3's text stream is whole on every
rank and its linears run without sequence parallelism in a sequence-parallel model, so its
adapters must not gather / reduce-scatter over the sequence as the image stream's do (7 text
tokens: an odd count, never split).
"""

from __future__ import annotations

import torch

from multiproc import run_world
from tiny_cogvideox import assert_grads_match, make_inputs, rel_err, save_diffusers_model
from tiny_sd3 import make_inputs as make_sd3_inputs
from tiny_sd3 import save_diffusers_model as save_sd3_model

TOL = 1e-5
LAYOUTS = [("tp1", 1, False), ("tp2", 2, False), ("tp2-sp", 2, True)]
# examples/sd35/sd3_medium_4step_lora.yaml's: both streams' attention projections and feed-forwards
SD3_MEDIUM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def _whole_adapters(adapters) -> dict[str, torch.Tensor]:
    from adm_megatron.models.weights import full_shape

    g = torch.Generator().manual_seed(5)
    return {n: 0.1 * torch.randn(full_shape(p), generator=g) for n, p in adapters.named_parameters()}


def _forward_backward(model, adapters, tp, latents, weight, call):
    """loss = sum(out * weight) through ``call(net, latents)`` (``net`` the model, in megatron DDP
    at TP > 1) -> (output, input gradient, whole adapter gradients, frozen parameters with a
    gradient)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from adm_megatron.models.weights import gather_tensor_parallel

    net = model if tp == 1 else DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    latents = latents.clone().requires_grad_(True)
    out = call(net, latents).sample
    (out * weight).sum().backward()
    if tp == 1:
        grads = {n: p.grad for n, p in adapters.named_parameters()}
    else:
        finalize_model_grads([net])
        grads = {n: gather_tensor_parallel(p.main_grad, p) for n, p in adapters.named_parameters()}
    frozen_grads = [p for p in model.parameters() if not p.requires_grad and p.grad is not None]
    return out.detach(), latents.grad, grads, len(frozen_grads)


def _assert_layouts_match(rank_results) -> None:
    ref_out, ref_dx, ref_grads, _ = rank_results["tp1"]
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for name in ("tp2", "tp2-sp"):
        out, dx, grads, frozen_with_grads = rank_results[name]
        assert rel_err(out, ref_out) <= TOL, name
        assert rel_err(dx, ref_dx) <= TOL, name
        assert_grads_match(grads, ref_grads, TOL, context=name)
        assert frozen_with_grads == 0


def _run_layouts(hf_dir, ckpt_dir):
    from adm_megatron.config import LoraConfig
    from adm_megatron.convert.checkpoint import load_megatron_checkpoint_into, save_megatron_checkpoint
    from adm_megatron.lora import apply_lora
    from adm_megatron.models import CogVideoXArch, build_model_from_hf
    from adm_megatron.models.weights import load_full_state_dict
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    arch = CogVideoXArch.from_pretrained_dir(hf_dir)
    inputs = make_inputs(arch, 2, 3, 4, 4)  # 16 text + 12 video tokens: divisible by TP = 2 under SP
    results = {}
    for name, tp, sp in LAYOUTS:
        initialize_parallel(tensor_parallel=tp, context_parallel=1, seed=7)
        model = build_model_from_hf(hf_dir, sequence_parallel=sp)
        adapters = apply_lora(model, LoraConfig(rank=4, alpha=8.0), seed=3)
        whole = _whole_adapters(adapters)
        load_full_state_dict(adapters, whole, source="test adapters")
        if name == "tp2-sp":
            save_megatron_checkpoint(model, ckpt_dir)
        latents, text, timestep, rotary, weight = inputs
        results[name] = _forward_backward(
            model, adapters, tp, latents, weight, lambda net, x: net(x, text, timestep, image_rotary_emb=rotary)
        )
        destroy_parallel()

    initialize_parallel(tensor_parallel=1, context_parallel=1, seed=7)
    model = build_model_from_hf(hf_dir)
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=8.0), seed=11)  # another start: the load must replace it
    load_megatron_checkpoint_into(model, ckpt_dir)
    results["reloaded_equal"] = all(torch.equal(p, whole[n]) for n, p in adapters.named_parameters())
    destroy_parallel()
    return results


def test_lora_tp2_and_tp2_sp_equal_one_process_and_reload_at_tp1(tmp_path):
    hf_dir = save_diffusers_model("5b", str(tmp_path))
    for rank_results in run_world(_run_layouts, 2, hf_dir, str(tmp_path / "ckpt"), timeout_s=300):
        assert rank_results.pop("reloaded_equal")
        _assert_layouts_match(rank_results)


def _run_sd3_layouts(hf_dirs: dict) -> dict:
    """Per variant: the three layouts' results, and the adapted linears' names in a block."""
    from adm_megatron.config import LoraConfig
    from adm_megatron.lora import apply_lora
    from adm_megatron.models import SD3Arch, build_model_from_hf
    from adm_megatron.models.weights import load_full_state_dict
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    config = LoraConfig(rank=4, alpha=8.0, target_modules=SD3_MEDIUM_TARGETS)
    results = {}
    for variant, hf_dir in hf_dirs.items():
        arch = SD3Arch.from_pretrained_dir(hf_dir)
        # 8 x 12 latents: 24 image tokens (12 per SP rank), 7 text tokens
        latents, text, pooled, timestep, weight = make_sd3_inputs(arch, 2, 8, 12)
        results[variant] = {}
        for name, tp, sp in LAYOUTS:
            initialize_parallel(tensor_parallel=tp, context_parallel=1, seed=7)
            model = build_model_from_hf(hf_dir, sequence_parallel=sp)
            adapters = apply_lora(model, config, seed=3)
            load_full_state_dict(adapters, _whole_adapters(adapters), source="test adapters")
            results[variant][name] = _forward_backward(
                model, adapters, tp, latents, weight, lambda net, x: net(x, text, pooled, timestep)
            )
            results[variant]["adapted"] = {t.path.split(".", 2)[2] for t in adapters.targets.values()}
            destroy_parallel()
    return results


def test_sd3_lora_on_both_streams_tp2_and_tp2_sp_equal_one_process(tmp_path):
    hf_dirs = {v: save_sd3_model(v, str(tmp_path)) for v in ("sd3", "sd35m")}
    for rank_results in run_world(_run_sd3_layouts, 2, hf_dirs, timeout_s=300):
        for variant, variant_results in rank_results.items():
            # the text stream's QKV, output projection and MLP are adapted (blocks.<i>.<name>)
            assert variant_results.pop("adapted") >= {
                "attention.linear_added_qkv", "attention.linear_added_proj",
                "mlp_context.linear_fc1", "mlp_context.linear_fc2",
            }, variant
            _assert_layouts_match(variant_results)
