"""The Transformer Engine spec of the CogVideoX and SD3 blocks and how ``select_spec`` /
``select_sd3_spec`` choose it.

Everywhere: ``select_spec('te')`` without TE is a one-line ValueError (also through ``build_model``),
'auto' is the local spec without CUDA, an unknown implementation is named in the error.

Where Transformer Engine imports (a CUDA machine with TE; never here or in CI, which have no GPU):
the TE spec's model equals the local spec's model built from the same diffusers directory, in fp32
and in bf16 (outputs and input gradients), for the 2b-style (sin-cos) and 5b-style (RoPE) variants,
and in fp32 for the SD3.5-style MMDiT.
"""

from __future__ import annotations

import pytest
import torch

import tiny_sd3
from adm_megatron.models import CogVideoXArch, SD3Arch, build_model, build_model_from_hf, build_sd3_model
from adm_megatron.models import specs
from adm_megatron.models.cogvideox_layer import CogVideoXLayer
from adm_megatron.models.core_attention import SDPACoreAttention
from adm_megatron.models.linears import ColumnParallelLinear, RowParallelLinear
from adm_megatron.models.norms import RMSNorm
from adm_megatron.models.sd3_layer import SD3Layer
from adm_megatron.precision import fp32_highest
from tiny_cogvideox import TINY_2B, make_inputs, rel_err, save_diffusers_model

TE_AVAILABLE = specs.transformer_engine_available()
needs_te = pytest.mark.skipif(
    not TE_AVAILABLE,
    reason="needs Transformer Engine with CUDA (TE is not importable here); runs on a GPU machine with TE",
)


def _parts(spec):
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    return {
        "layer": spec.module,
        "linear_qkv": attention.linear_qkv,
        "linear_proj": attention.linear_proj,
        "core_attention": attention.core_attention,
        "linear_fc1": mlp.linear_fc1,
        "linear_fc2": mlp.linear_fc2,
    }


LOCAL_PARTS = {
    "layer": CogVideoXLayer,
    "linear_qkv": ColumnParallelLinear,
    "linear_proj": RowParallelLinear,
    "core_attention": SDPACoreAttention,
    "linear_fc1": ColumnParallelLinear,
    "linear_fc2": RowParallelLinear,
}


# ------------------------------------------------------------------------------------------------
# Everywhere


def test_te_without_transformer_engine_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: False)
    with pytest.raises(ValueError) as info:
        specs.select_spec("te")
    message = str(info.value)
    assert message == "model implementation 'te': Transformer Engine with CUDA is not available here"
    assert "\n" not in message


def test_te_here_raises_or_gives_the_te_spec():
    """Without monkeypatching: the error where TE does not import (this machine, CI), the TE spec
    where it does."""
    if not TE_AVAILABLE:
        with pytest.raises(ValueError, match="Transformer Engine with CUDA is not available here"):
            specs.select_spec("te")
    else:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        assert _parts(specs.select_spec("te"))["linear_qkv"] is TEColumnParallelLinear


def test_auto_without_cuda_is_the_local_spec(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert specs.transformer_engine_available() is False
    assert _parts(specs.select_spec("auto")) == LOCAL_PARTS


def test_local_is_the_local_spec_everywhere():
    assert _parts(specs.select_spec("local")) == LOCAL_PARTS
    assert _parts(specs.local_layer_spec()) == LOCAL_PARTS


@pytest.mark.parametrize("impl", ["bogus", "TE", "", "transformer_engine"])
def test_unknown_implementation_is_named(impl):
    with pytest.raises(ValueError, match=rf"model implementation {impl!r}: expected 'auto', 'local' or 'te'"):
        specs.select_spec(impl)


def test_build_model_with_te_unavailable_fails_before_building(world_of_one, monkeypatch):
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: False)
    arch = CogVideoXArch.from_diffusers_config(TINY_2B)
    with pytest.raises(ValueError, match="'te': Transformer Engine with CUDA is not available here"):
        build_model(arch, impl="te")
    with pytest.raises(ValueError, match="model implementation 'bogus'"):
        build_model(arch, impl="bogus")


def _sd3_parts(spec):
    attention = spec.submodules.attention.submodules
    mlp = spec.submodules.mlp.submodules
    return {
        "layer": spec.module,
        "linear_qkv": attention.linear_qkv,
        "linear_added_qkv": attention.linear_added_qkv,
        "linear_proj": attention.linear_proj,
        "linear_added_proj": attention.linear_added_proj,
        "core_attention": attention.core_attention,
        "linear_fc1": mlp.linear_fc1,
        "linear_fc2": mlp.linear_fc2,
        "qk_norms": {attention.q_layernorm, attention.k_layernorm, attention.added_q_layernorm,
                     attention.added_k_layernorm},
    }


def test_sd3_local_spec_with_and_without_qk_norm():
    parts = _sd3_parts(specs.select_sd3_spec("local", qk_norm=True))
    assert parts.pop("qk_norms") == {RMSNorm}
    assert parts == {
        **LOCAL_PARTS, "layer": SD3Layer, "linear_added_qkv": ColumnParallelLinear,
        "linear_added_proj": RowParallelLinear,
    }
    assert _sd3_parts(specs.select_sd3_spec("local", qk_norm=False))["qk_norms"] == {None}


def test_build_sd3_with_te_unavailable_fails_before_building(world_of_one, monkeypatch):
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: False)
    arch = SD3Arch.from_diffusers_config(tiny_sd3.TINY_SD35)
    with pytest.raises(ValueError, match="'te': Transformer Engine with CUDA is not available here"):
        build_sd3_model(arch, impl="te")


# ------------------------------------------------------------------------------------------------
# Where Transformer Engine imports (CUDA)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_te")
    return {v: save_diffusers_model(v, str(root)) for v in ("2b", "5b")}


def _run(model, hf_dir, dtype, device):
    from diffusers import CogVideoXTransformer3DModel

    config = CogVideoXTransformer3DModel.load_config(hf_dir)
    latents, text, timestep, rotary, weight = make_inputs(CogVideoXArch.from_diffusers_config(config), 2, 3, 8, 8)
    latents = latents.to(device, dtype).requires_grad_(True)
    text = text.to(device, dtype).requires_grad_(True)
    rotary = None if rotary is None else tuple(r.to(device) for r in rotary)
    out = model(latents, text, timestep.to(device), image_rotary_emb=rotary).sample
    (out.float() * weight.to(device)).sum().backward()
    return {"out": out.detach().float(), "d_latents": latents.grad.float(), "d_text": text.grad.float()}


@needs_te
def test_auto_with_te_is_the_te_spec():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    from adm_megatron.models.te_core_attention import TECoreAttention

    parts = _parts(specs.select_spec("auto"))
    assert parts["linear_qkv"] is TEColumnParallelLinear and parts["linear_fc1"] is TEColumnParallelLinear
    assert parts["linear_proj"] is TERowParallelLinear and parts["linear_fc2"] is TERowParallelLinear
    assert parts["core_attention"] is TECoreAttention
    assert parts["layer"] is CogVideoXLayer  # the same layer class for both specs


@needs_te
@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_te_equals_local_in_fp32(world_of_one, hf_dirs, variant):
    device = world_of_one.device
    with fp32_highest():
        local = _run(build_model_from_hf(hf_dirs[variant], impl="local"), hf_dirs[variant], torch.float32, device)
        te = _run(build_model_from_hf(hf_dirs[variant], impl="te"), hf_dirs[variant], torch.float32, device)
    for name in local:
        # TE's fp32 GEMMs and unfused attention may round differently (TF32 inside TE): 2e-3
        assert rel_err(te[name], local[name]) <= 2e-3, (variant, name, rel_err(te[name], local[name]))


@needs_te
@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_te_in_bf16_is_as_close_to_fp32_as_local_bf16(world_of_one, hf_dirs, variant):
    device = world_of_one.device
    hf_dir = hf_dirs[variant]
    with fp32_highest():
        reference = _run(build_model_from_hf(hf_dir, impl="local"), hf_dir, torch.float32, device)
    local = _run(build_model_from_hf(hf_dir, impl="local", params_dtype=torch.bfloat16), hf_dir,
                 torch.bfloat16, device)
    te = _run(build_model_from_hf(hf_dir, impl="te", params_dtype=torch.bfloat16), hf_dir,
              torch.bfloat16, device)
    for name in reference:
        local_err = rel_err(local[name], reference[name])
        te_err = rel_err(te[name], reference[name])
        assert torch.isfinite(te[name]).all(), (variant, name)
        assert te_err <= 1.5 * local_err + 1e-2 and te_err <= 8e-2, (variant, name, te_err, local_err)


@needs_te
def test_sd3_te_equals_local_in_fp32(world_of_one, tmp_path):
    device = world_of_one.device
    hf_dir = tiny_sd3.save_diffusers_model("sd35", str(tmp_path))
    results = []
    with fp32_highest():
        for impl in ("local", "te"):
            model = build_model_from_hf(hf_dir, impl=impl)
            latents, text, pooled, timestep, weight = (
                t.to(device) for t in tiny_sd3.make_inputs(model.arch, 2, 8, 12)
            )
            latents.requires_grad_(True)
            out = model(latents, text, pooled, timestep).sample
            (out * weight).sum().backward()
            results.append({"out": out.detach(), "d_latents": latents.grad})
    local, te = results
    for name in local:
        assert rel_err(te[name], local[name]) <= 2e-3, (name, rel_err(te[name], local[name]))
