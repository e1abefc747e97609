"""The megatron SD3 equals diffusers' SD3Transformer2DModel in fp32 (one process): outputs, input
gradients and every weight gradient, for an SD3-Medium-style (no q/k norm), an SD3.5-Large-style
(q/k RMSNorm) and an SD3.5-Medium-style (q/k RMSNorm, dual attention) tiny config at latent sizes other than the config's sample size (square, non-square,
smaller and larger: the cropped position embedding differs for each); recompute changes nothing;
features are the tapped blocks' image tokens; the diffusers <-> megatron mapping round-trips bit for
bit; real-size SD3-Medium, SD3.5-Large and SD3.5-Medium build on the meta device with diffusers'
parameter count."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from adm_megatron.convert.sd3_mapping import hf_to_megatron, megatron_to_hf
from adm_megatron.models import SD3Arch, build_sd3_model, build_model_from_hf, read_diffusers_weights
from adm_megatron.families.sd3_presets import PRESETS as SD3_PRESETS
from adm_megatron.models.weights import gather_full_state_dict
from tiny_cogvideox import assert_grads_match, rel_err
from tiny_sd3 import TEXT_TOKENS, make_inputs, save_diffusers_model

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|, per tensor
SIZES = [(16, 16), (8, 12), (20, 14)]  # latent (height, width); sample size 16 x 16, grid 12 x 12 patches


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("sd3", "sd35", "sd35m")}


def _run(model, inputs, **kwargs):
    latents, text, pooled, timestep, weight = inputs
    latents, text, pooled = (t.clone().requires_grad_(True) for t in (latents, text, pooled))
    out = model(latents, text, pooled, timestep, **kwargs).sample
    (out * weight).sum().backward()
    return out.detach(), latents.grad, text.grad, pooled.grad


@pytest.mark.parametrize("variant", ["sd3", "sd35", "sd35m"])
def test_outputs_and_all_gradients_match_diffusers(world_of_one, hf_dirs, variant):
    reference = SD3Transformer2DModel.from_pretrained(hf_dirs[variant])
    ours = build_model_from_hf(hf_dirs[variant])
    heads = reference.config.num_attention_heads
    for size in SIZES:
        reference.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        inputs = make_inputs(reference.config, 2, *size)
        expected = _run(reference, inputs)
        got = _run(ours, inputs)
        assert got[0].shape == expected[0].shape == (2, 4, *size)
        for what, a, b in zip(("out", "d_latents", "d_text", "d_pooled"), got, expected):
            assert rel_err(a, b) <= TOL, (size, what, rel_err(a, b))
        grads = megatron_to_hf({n: p.grad for n, p in ours.named_parameters()}, heads)
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        assert_grads_match(grads, ref_grads, TOL, context=size)


def test_recompute_gives_the_same_gradients(world_of_one, hf_dirs):
    plain = build_model_from_hf(hf_dirs["sd35m"])
    recomputed = build_model_from_hf(hf_dirs["sd35m"], recompute=True)
    assert recomputed.config.recompute_granularity == "full"
    inputs = make_inputs(plain.arch, 2, 8, 12)
    out_a, dx_a, dtext_a, _ = _run(plain, inputs)
    out_b, dx_b, dtext_b, _ = _run(recomputed, inputs)
    assert torch.equal(out_a, out_b)
    assert torch.allclose(dx_a, dx_b, rtol=0, atol=1e-6) and torch.allclose(dtext_a, dtext_b, rtol=0, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-6, name  # temb's gradient sums in another order


def test_features_are_the_tapped_blocks_image_tokens_and_nothing_after_runs(world_of_one, hf_dirs):
    """A features call returns the tapped blocks' image tokens of the whole forward, bit for bit, as
    [B, hidden, H/p, W/p], and runs no block after the last tapped one and no output layer."""
    model = build_model_from_hf(hf_dirs["sd3"])
    arch = model.arch
    latents, text, pooled, timestep, _ = make_inputs(arch, 2, 8, 12)
    ran = []
    for name in ("blocks.0", "blocks.1", "blocks.2", "norm_out", "proj_out"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: ran.append((name, o)))
    full = model(latents, text, pooled, timestep).sample
    whole_run = dict(ran)
    ran.clear()
    out = model(latents, text, pooled, timestep, return_features=True, feature_every=2)
    assert [name for name, _ in ran] == ["blocks.0", "blocks.1"] and out.sample is None
    (feature,) = out.features
    assert feature.shape == (2, arch.hidden_size, 4, 6)
    image = whole_run["blocks.1"][0].transpose(0, 1)  # [b, tokens, hidden]
    assert torch.equal(feature.permute(0, 2, 3, 1).reshape(2, -1, arch.hidden_size), image)
    assert torch.equal(full, model(latents, text, pooled, timestep).sample)
    every = model(latents, text, pooled, timestep, return_features=True).features  # default: every block
    assert [tuple(f.shape) for f in every] == [(2, arch.hidden_size, 4, 6)] * 3


@pytest.mark.parametrize("variant", ["sd3", "sd35", "sd35m"])
def test_mapping_round_trip_is_bit_exact(world_of_one, hf_dirs, variant):
    hf = read_diffusers_weights(hf_dirs[variant])
    arch = SD3Arch.from_pretrained_dir(hf_dirs[variant])
    meg = hf_to_megatron(hf, arch.num_attention_heads)
    model = build_sd3_model(arch)
    assert meg.keys() == {k for k in model.state_dict() if not k.endswith("_extra_state")}
    back = megatron_to_hf(meg, arch.num_attention_heads)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    # a model's export loads strictly into diffusers' model built from the architecture's config
    model.load_state_dict(meg, strict=False)
    exported = SD3Transformer2DModel(**arch.to_diffusers_config())
    exported.load_state_dict(megatron_to_hf(gather_full_state_dict(model), arch.num_attention_heads), strict=True)
    assert all(torch.equal(exported.state_dict()[k], hf[k]) for k in hf)
    # the image and text QKV are fused per head: head h's rows are [q_h; k_h; v_h] of that stream
    d = arch.attention_head_dim
    fused = meg["blocks.0.attention.linear_added_qkv.weight"]
    assert torch.equal(fused[d:2 * d], hf["transformer_blocks.0.attn.add_k_proj.weight"][:d])
    assert "blocks.2.attention.linear_added_proj.weight" not in meg  # context_pre_only last block
    with pytest.raises(KeyError, match="'transformer_blocks.0.attn.bogus.weight': no megatron counterpart"):
        hf_to_megatron({**hf, "transformer_blocks.0.attn.bogus.weight": torch.zeros(1)}, arch.num_attention_heads)


@pytest.mark.parametrize(
    "preset, blocks, at_least", [("sd3-medium", 24, 2.0e9), ("sd3.5-large", 38, 8.0e9), ("sd3.5-medium", 24, 2.2e9)]
)
def test_real_size_config_on_meta_has_diffusers_parameter_count(world_of_one, preset, blocks, at_least):
    config = SD3_PRESETS[preset]
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"})
    ours = build_sd3_model(SD3Arch.from_diffusers_config(config), device="meta")
    assert all(p.is_meta for p in ours.parameters())
    assert len(ours.blocks) == len(reference.transformer_blocks) == blocks
    expected = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert expected > at_least


def test_unsupported_architecture_and_bad_inputs_are_named(world_of_one, hf_dirs):
    with pytest.raises(ValueError, match=r"dual_attention_layers=\[3, 18\]: expected block indices in \[0, 18\)"):
        SD3Arch.from_diffusers_config({"dual_attention_layers": [3, 18], "caption_projection_dim": 1152})
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        SD3Arch.from_diffusers_config({"qk_norm": "layer_norm", "caption_projection_dim": 1152})
    with pytest.raises(ValueError, match="_class_name is 'CogVideoXTransformer3DModel'"):
        SD3Arch.from_diffusers_config({"_class_name": "CogVideoXTransformer3DModel"})
    model = build_model_from_hf(hf_dirs["sd3"])
    text, pooled, t = torch.zeros(1, TEXT_TOKENS, 24), torch.zeros(1, 20), torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"hidden_states shape \(1, 3, 8, 8\): expected \[B, 4, H, W\]"):
        model(torch.zeros(1, 3, 8, 8), text, pooled, t)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        model(torch.zeros(1, 4, 7, 8), text, pooled, t)
    with pytest.raises(ValueError, match="at most pos_embed_max_size=12 patches"):
        model(torch.zeros(1, 4, 26, 8), text, pooled, t)
    with pytest.raises(ValueError, match=r"pooled_projections shape None: expected \[1, 20\]"):
        model(torch.zeros(1, 4, 8, 8), text, None, t)
    with pytest.raises(ValueError, match="skip_layers: not supported"):
        model(torch.zeros(1, 4, 8, 8), text, pooled, t, skip_layers=[1])
