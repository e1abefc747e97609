"""The megatron CogVideoX equals diffusers' CogVideoXTransformer3DModel in fp32 (one process):
outputs, input gradients and every weight gradient, for the 2b-style (sin-cos) and 5b-style (RoPE)
variants at sizes other than the config's sample size; recompute changes nothing; real-size configs
build on the meta device with diffusers' exact parameter count."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from adm_megatron.convert.cogvideox_mapping import megatron_to_hf
from adm_megatron.models import CogVideoXArch, build_model, build_model_from_hf
from adm_megatron.families.cogvideox_presets import PRESETS
from tiny_cogvideox import assert_grads_match, make_inputs, rel_err, save_diffusers_model

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|, per tensor
SIZES = [(3, 8, 8), (2, 6, 10), (4, 4, 12)]  # latent (frames, height, width); sample size is 3x8x8


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("2b", "5b")}


def _run(model, inputs, **kwargs):
    latents, text, timestep, rotary, weight = inputs
    latents = latents.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    out = model(latents, text, timestep, image_rotary_emb=rotary, **kwargs).sample
    (out * weight).sum().backward()
    return out.detach(), latents.grad, text.grad


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_outputs_and_all_gradients_match_diffusers(world_of_one, hf_dirs, variant):
    reference = CogVideoXTransformer3DModel.from_pretrained(hf_dirs[variant])
    ours = build_model_from_hf(hf_dirs[variant])
    heads = reference.config.num_attention_heads
    for size in SIZES:
        reference.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        inputs = make_inputs(reference.config, 2, *size)
        ref_out, ref_dx, ref_dtext = _run(reference, inputs)
        out, dx, dtext = _run(ours, inputs)
        assert out.shape == ref_out.shape
        assert rel_err(out, ref_out) <= TOL, (size, rel_err(out, ref_out))
        assert rel_err(dx, ref_dx) <= TOL, size
        assert rel_err(dtext, ref_dtext) <= TOL, size
        grads = megatron_to_hf({n: p.grad for n, p in ours.named_parameters()}, heads)
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        assert_grads_match(grads, ref_grads, TOL, context=size)


def test_recompute_gives_the_same_gradients(world_of_one, hf_dirs):
    plain = build_model_from_hf(hf_dirs["5b"])
    recomputed = build_model_from_hf(hf_dirs["5b"], recompute=True)
    assert recomputed.config.recompute_granularity == "full"
    config = CogVideoXTransformer3DModel.load_config(hf_dirs["5b"])
    inputs = make_inputs(CogVideoXArch.from_diffusers_config(config), 2, 2, 6, 10)
    out_a, dx_a, _ = _run(plain, inputs)
    out_b, dx_b, _ = _run(recomputed, inputs)
    assert torch.equal(out_a, out_b)
    assert torch.allclose(dx_a, dx_b, rtol=0, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_features_are_the_tapped_blocks_video_tokens_and_nothing_after_runs(world_of_one, tmp_path):
    """A features call returns the tapped blocks' outputs of the whole forward, bit for bit, and
    runs no block after the last tapped one and no output layer (3 blocks, taps every 2nd: block 1)."""
    model = build_model_from_hf(save_diffusers_model("2b", str(tmp_path), num_layers=3))
    arch = model.arch
    latents, text, timestep, rotary, _ = make_inputs(arch, 2, 3, 8, 8)
    ran = []
    for name in ("blocks.0", "blocks.1", "blocks.2", "norm_final", "norm_out", "proj_out"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: ran.append((name, o)))
    full = model(latents, text, timestep).sample
    whole_run = dict(ran)
    ran.clear()
    out = model(latents, text, timestep, return_features=True, feature_every=2)
    assert [name for name, _ in ran] == ["blocks.0", "blocks.1"] and out.sample is None
    (feature,) = out.features
    assert feature.shape == (2, arch.hidden_size, 3, 4, 4)
    video = whole_run["blocks.1"][arch.max_text_seq_length:].transpose(0, 1)  # [b, tokens, hidden]
    assert torch.equal(feature.permute(0, 2, 3, 4, 1).reshape(2, -1, arch.hidden_size), video)
    assert torch.equal(full, model(latents, text, timestep).sample)
    assert len(model(latents, text, timestep, return_features=True, feature_every=1).features) == 3
    with pytest.raises(ValueError, match="every=4 taps no block of a 3-layer"):
        model(latents, text, timestep, return_features=True, feature_every=4)


@pytest.mark.parametrize("preset", ["cogvideox-2b", "cogvideox-5b"])
def test_real_size_config_on_meta_has_diffusers_parameter_count(world_of_one, preset):
    config = PRESETS[preset]
    with torch.device("meta"):
        reference = CogVideoXTransformer3DModel(**{k: v for k, v in config.items() if k != "_class_name"})
    ours = build_model(CogVideoXArch.from_diffusers_config(config), device="meta")
    assert all(p.is_meta for p in ours.parameters())
    expected = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert expected > (1.6e9 if preset == "cogvideox-2b" else 5.5e9)


def test_unsupported_architecture_and_bad_inputs_are_named(world_of_one, hf_dirs):
    with pytest.raises(ValueError, match="patch_size_t=2 is not supported"):
        CogVideoXArch.from_diffusers_config({"patch_size_t": 2})
    model = build_model_from_hf(hf_dirs["2b"])
    with pytest.raises(ValueError, match=r"hidden_states shape \(1, 3, 5, 8, 8\)"):
        model(torch.zeros(1, 3, 5, 8, 8), torch.zeros(1, 16, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        model(torch.zeros(1, 3, 4, 7, 8), torch.zeros(1, 16, 32), torch.tensor([1]))
