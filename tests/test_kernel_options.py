"""``model.attention_backend`` and ``model.fp8`` (models/attention_backend.py, models/fp8.py,
models/kernel_options.py) on CPU: every SDPA backend this machine has gives the tiny CogVideoX's
output and gradients of the math kernel; ``auto`` picks one of them, once per call shape, and
records it; what cannot run here (a backend, TE's attention, FP8) is refused in one line before
anything is built; FP8's refusals for the local spec and for cards below compute capability 8.9.
The FP8 run itself is a GPU step (tools/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from tiny_cogvideox import make_diffusers_model, make_inputs, rel_err

SDPA_NAMES = ("flash", "efficient", "cudnn", "math")


def _output_and_grads(model, inputs):
    latents, text, timestep, rotary, weight = inputs
    model.zero_grad(set_to_none=True)
    latents = latents.clone().requires_grad_(True)
    out = model(latents, text, timestep, image_rotary_emb=rotary).sample
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), latents.grad, grads


def test_every_available_backend_equals_math_and_auto_records_its_choice(world_of_one):
    from adm_megatron.families import family_of_arch
    from adm_megatron.models import CogVideoXArch
    from adm_megatron.models.attention_backend import MATH_SKIPPED, auto_choices, forget_auto_choices, probe
    from adm_megatron.models.core_attention import SDPACoreAttention, set_attention_backend
    from adm_megatron.models.weights import load_full_state_dict

    reference = make_diffusers_model("5b")
    arch = CogVideoXArch.from_diffusers_config(dict(reference.config))
    family = family_of_arch(arch)
    model = family.build_model(arch, impl="local")
    load_full_state_dict(model, family.hf_to_megatron(reference.state_dict(), arch), source="test")
    inputs = make_inputs(arch, batch=2, frames=2, height=4, width=4)
    cores = [m for m in model.modules() if isinstance(m, SDPACoreAttention)]
    assert len(cores) == arch.num_layers

    set_attention_backend(model, "math")
    ref_out, ref_dx, ref_grads = _output_and_grads(model, inputs)
    available = [n for n in SDPA_NAMES if probe(n, torch.device("cpu"), torch.float32, arch.attention_head_dim) is None]
    assert "math" in available and "flash" in available  # torch's CPU kernels
    forget_auto_choices()
    for backend in ("default", "auto", *available):
        set_attention_backend(model, backend)
        assert all(core.backend == backend for core in cores)
        out, dx, grads = _output_and_grads(model, inputs)
        assert rel_err(out, ref_out) < 1e-5 and rel_err(dx, ref_dx) < 1e-5, backend
        for name, grad in grads.items():
            assert rel_err(grad, ref_grads[name]) < 1e-4, (backend, name)
    (choice,) = auto_choices()  # one call shape: every block's attention is the same
    assert choice["backend"] in available
    assert choice["query_shape"] == [2, arch.num_attention_heads, 16 + 2 * 2 * 2, arch.attention_head_dim]
    assert set(choice["seconds"]) == set(SDPA_NAMES)
    for name in SDPA_NAMES:  # timed where available, the reason where not
        if name != "math":
            assert isinstance(choice["seconds"][name], float) == (name in available), name
    # math only where no fused kernel serves (it materialises the whole score matrix)
    assert choice["seconds"]["math"] == MATH_SKIPPED and choice["backend"] != "math"
    unavailable = [n for n in SDPA_NAMES if n not in available]
    assert unavailable  # CPU torch has no memory-efficient / cuDNN kernels
    set_attention_backend(model, unavailable[0])  # really that kernel: no silent fallback
    with pytest.raises(RuntimeError, match="No viable backend"):
        _output_and_grads(model, inputs)


def test_auto_times_math_only_where_no_fused_kernel_serves(monkeypatch):
    from adm_megatron.models import attention_backend

    q = torch.randn(1, 2, 16, 8)
    attention_backend.forget_auto_choices()
    # CPU torch's one fused kernel (flash) taken away: math is what serves, so it is timed and chosen
    monkeypatch.setattr(attention_backend, "SDPA_BACKENDS",
                        {k: v for k, v in attention_backend.SDPA_BACKENDS.items() if k != "flash"})
    assert attention_backend.choose(q, q, q) == "math"
    (choice,) = attention_backend.auto_choices()
    assert isinstance(choice["seconds"]["math"], float)
    attention_backend.forget_auto_choices()


def test_a_backend_this_machine_lacks_is_refused_in_one_line(cogvideox_pipeline, tmp_path, monkeypatch):
    from adm_megatron.config import ConfigError, load_config
    from adm_megatron.train.trainer import Trainer

    built = []
    monkeypatch.setattr("adm_megatron.train.trainer.initialize_parallel", lambda *a, **k: built.append(1))
    for override, expected in [
        ("model.attention_backend=efficient", r"model.attention_backend=efficient: not available for torch.float32 "
                                              r"on cpu \(head size \d+\): "),
        ("model.attention_backend=cudnn", r"model.attention_backend=cudnn: not available"),
        ("model.attention_backend=te", r"model.attention_backend=te: Transformer Engine's attention comes with the "
                                       r"TE spec, and this run builds the local one"),
        ("model.fp8=hybrid", r"model.fp8=hybrid: FP8 runs in Transformer Engine's linears, and this run builds the "
                             r"local spec"),
    ]:
        config = load_config(None, [f"model.teacher={cogvideox_pipeline}", f"output_dir={tmp_path / 'run'}",
                                    override, "distill.head_every=1", "logging.wandb_mode=disabled"])
        with pytest.raises(ConfigError, match=expected) as err:
            Trainer(config)
        assert "\n" not in str(err.value)
    assert not built and not (tmp_path / "run").exists()  # refused before any process group or file


def test_bad_names_and_fp8_with_the_local_spec_fail_at_config_load():
    from adm_megatron.config import ConfigError, load_config

    for overrides, expected in [
        (["model.attention_backend=fastest"], "model.attention_backend='fastest': expected one of default, auto, te, "
                                              "flash, efficient, cudnn, math"),
        (["model.fp8=e5m2"], "model.fp8='e5m2': expected one of null, hybrid, e4m3"),
        (["model.fp8=hybrid", "model.impl=local"], "model.fp8=hybrid needs the Transformer Engine spec"),
        (["model.fp8=e4m3", "model.dtype=fp64"], "model.fp8=e4m3 with model.dtype=fp64"),
        (["model.fp8=hybrid", "model.fp8_amax_history_len=0"], "model.fp8_amax_history_len=0: expected >= 1"),
        (["model.fp8_amax_compute_algo=mean"], "model.fp8_amax_compute_algo='mean': expected one of max, most_recent"),
        (["model.attention_backend=te", "model.impl=local"], "model.attention_backend=te with model.impl=local"),
    ]:
        with pytest.raises(ConfigError, match=expected) as err:
            load_config(None, ["model.teacher=/nowhere", *overrides])
        assert "\n" not in str(err.value)
    assert load_config(None, ["model.teacher=/x", "model.fp8=null"]).model.fp8 is None
    assert load_config(None, ["model.teacher=/x", "model.fp8=hybrid"]).model.fp8 == "hybrid"


def test_fp8_needs_te_cuda_and_compute_capability_8_9():
    from adm_megatron.models.fp8 import check_fp8

    check_fp8(None, "local", None)  # off: nothing to check
    check_fp8("hybrid", "te", (8, 9))  # an L40S / RTX 4090
    check_fp8("e4m3", "te", (9, 0))  # an H100 / H200
    for spec, capability, expected in [
        ("local", (9, 0), "model.fp8=hybrid: FP8 runs in Transformer Engine's linears"),
        ("te", None, "model.fp8=hybrid: needs a CUDA GPU"),
        ("te", (8, 0), r"model.fp8=hybrid: this GPU \(compute capability 8.0\) has no FP8 tensor cores; FP8 needs "
                       r"8.9 or later"),
        ("te", (8, 6), r"compute capability 8.6"),
    ]:
        with pytest.raises(ValueError, match=expected):
            check_fp8("hybrid", spec, capability)


def test_fp8_settings_reach_megatrons_recipe_fields(world_of_one):
    from megatron.core.fp8_utils import get_fp8_context

    from adm_megatron.families import family_of_arch
    from adm_megatron.models import CogVideoXArch
    from adm_megatron.models.fp8 import enable_fp8

    arch = CogVideoXArch.from_diffusers_config(dict(make_diffusers_model("2b").config))
    model = family_of_arch(arch).build_model(arch, impl="local", device="meta")
    enable_fp8(model, "e4m3", margin=1, amax_history_len=16, amax_compute_algo="most_recent")
    c = model.config
    assert (c.fp8, c.fp8_recipe, c.fp8_margin, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (
        "e4m3", "delayed", 1, 16, "most_recent")
    assert all(block.config is c for block in model.blocks)  # one config: every block sees the recipe
    enable_fp8(model, None)
    assert c.fp8 is None and type(get_fp8_context(c)).__name__ == "nullcontext"
