"""LoRA generators in one process: a fresh LoRA model equals its base exactly, only the adapters
train (the base is frozen and outside megatron DDP's grad buffers), and after a change of the
adapters our output equals diffusers' ``CogVideoXTransformer3DModel`` with the merged export and
diffusers' model with the exported LoRA file loaded by ``CogVideoXPipeline.load_lora_weights``
(tolerance 1e-5 relative; alpha 12 with rank 4 is neither PEFT's default alpha nor alpha = rank,
so the scale must survive both paths). Targets are diffusers names; part of the fused QKV, or a
name that is no parallel linear, is refused in one line, and the ``model.lora`` config section
parses and validates."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from adm_megatron.config import ConfigError, LoraConfig, keys_located, load_config
from tiny_cogvideox import make_inputs, rel_err, save_diffusers_model

TOL = 1e-5
ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _forward(model, inputs):
    latents, text, timestep, rotary, _ = inputs
    return model(latents, text, timestep, image_rotary_emb=rotary).sample


def _perturb(adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_fresh_lora_generator_equals_base_and_only_adapters_reach_ddp(variant, tmp_path, world_of_one):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from adm_megatron.lora import apply_lora
    from adm_megatron.models import build_model_from_hf

    model = build_model_from_hf(save_diffusers_model(variant, str(tmp_path)))
    inputs = make_inputs(model.arch, 2, 3, 4, 4)
    base = _forward(model, inputs)
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=ALL_TARGETS), seed=1)
    assert len(adapters) == 4 * model.arch.num_layers
    assert torch.equal(_forward(model, inputs), base)  # B starts at zero

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"lora.{n}" for n, _ in adapters.named_parameters()}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    in_buffers = sum(p.numel() for buffer in ddp.buffers for p in buffer.params)
    assert in_buffers == adapters.numel()
    assert adapters.numel() == sum(p.numel() for p in adapters.parameters()) > 0


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("lora") / "pipe"), seed=0)


@pytest.mark.parametrize("targets", [ALL_TARGETS, ["attn1.to_out.0", "ff.net.2"]], ids=["all", "row-only"])
def test_changed_adapters_equal_diffusers_merged_and_lora_file(targets, pipeline_dir, tmp_path, world_of_one):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from adm_megatron.lora import apply_lora
    from adm_megatron.lora.export import LORA_WEIGHTS, export_lora_file, export_merged
    from adm_megatron.models import build_model_from_hf

    model = build_model_from_hf(os.path.join(pipeline_dir, "transformer"))
    inputs = make_inputs(model.arch, 2, 3, 8, 8)
    base = _forward(model, inputs)
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=12.0, target_modules=targets), seed=1)
    _perturb(adapters)
    with torch.no_grad():
        ours = _forward(model, inputs)
    assert rel_err(ours, base) > 1e-2  # the adapters matter

    merged_dir = export_merged(model, model.arch, str(tmp_path / "merged"))
    merged = CogVideoXTransformer3DModel.from_pretrained(merged_dir)
    with torch.no_grad():
        assert rel_err(_forward(merged, inputs), ours) <= TOL

    lora_dir = export_lora_file(model, str(tmp_path / "lora"))
    with safe_open(os.path.join(lora_dir, LORA_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
    expect = {f"transformer.transformer_blocks.{i}.{m}" for i in range(model.arch.num_layers)
              for m in (["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                         "ff.net.2"] if targets is ALL_TARGETS else ["attn1.to_out.0", "ff.net.2"])}
    assert modules == expect  # the fused QKV split back into to_q / to_k / to_v adapters
    pipe = CogVideoXPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS)
    with torch.no_grad():
        assert rel_err(_forward(pipe.transformer, inputs), ours) <= TOL


def test_targets_are_diffusers_names_and_bad_ones_fail_in_one_line(tmp_path, world_of_one):
    from adm_megatron.lora import apply_lora, resolve_targets
    from adm_megatron.lora.targets import default_key_mapping
    from adm_megatron.models import build_model_from_hf

    model = build_model_from_hf(save_diffusers_model("2b", str(tmp_path)))
    to_hf = default_key_mapping(model)
    chosen = resolve_targets(model, ["to_q", "to_k", "to_v"], to_hf)
    assert [(t.path, t.kind, t.hf_modules) for t in chosen][0] == (
        "blocks.0.self_attention.linear_qkv", "column",
        ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v"))
    kinds = {t.path.split(".", 2)[2]: t.kind for t in resolve_targets(model, ALL_TARGETS, to_hf)}
    assert kinds == {"self_attention.linear_qkv": "column", "self_attention.linear_proj": "row",
                     "mlp.linear_fc1": "column", "mlp.linear_fc2": "row"}
    for targets, message in [
        (["to_q", "to_v"], "targets only part of the fused layer blocks.0.self_attention.linear_qkv"),
        (["to_q", "to_k", "to_v", "proj_out"], "'proj_out' names no tensor-parallel linear"),
        (["norm1.linear"], "'norm1.linear' names no tensor-parallel linear"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            apply_lora(model, LoraConfig(target_modules=targets), seed=0)
        assert "\n" not in str(err.value)
    assert not hasattr(model, "lora")  # a refused config leaves the model untouched
    assert all(p.requires_grad for p in model.parameters())


def test_lora_config_section_parses_and_validates():
    base = ["model.teacher=x"]
    assert load_config(None, base).model.lora is None  # full fine-tune by default
    config = load_config(None, base + ["model.lora={rank: 8, alpha: 4, target_modules: [to_out.0]}"])
    assert (config.model.lora.rank, config.model.lora.alpha, config.model.lora.target_modules) == (8, 4.0, ["to_out.0"])
    assert load_config(None, base + ["model.lora.rank=2"]).model.lora.target_modules == ALL_TARGETS
    assert load_config(None, base + ["model.lora.rank=2", "model.lora=null"]).model.lora is None
    for override, message in [
        ("model.lora.rank=0", "model.lora: rank=0"),
        ("model.lora.target_modules=[]", "model.lora.target_modules=\\[\\]"),
        ("model.lora.target_modules=to_q", "model.lora.target_modules='to_q': expected a list"),
        ("model.lora.dropout=0.1", "unknown key 'model.lora.dropout'"),
        ("train.export_lora=file", "train.export_lora='file': expected one of merged, adapter, both"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [override])


def test_export_lora_modes_write_what_they_say(tmp_path, world_of_one):
    from adm_megatron.lora import apply_lora
    from adm_megatron.convert.distillation_record import DISTILLATION_FILE, read_distillation_record
    from adm_megatron.lora.export import LORA_WEIGHTS, export_lora_generator
    from adm_megatron.models import build_model_from_hf

    model = build_model_from_hf(save_diffusers_model("2b", str(tmp_path)))
    apply_lora(model, LoraConfig(rank=2, target_modules=["to_out.0"]), seed=0)
    for mode, written in [("adapter", ["generator_lora"]), ("merged", ["generator"]),
                          ("both", ["generator", "generator_lora"])]:
        out = tmp_path / mode
        merged = export_lora_generator(model, model.arch, str(out / "generator"), mode, record={"generator_steps": 4})
        assert sorted(os.listdir(out)) == written
        assert merged == (str(out / "generator") if "generator" in written else None)
        if "generator_lora" in written:
            assert sorted(os.listdir(out / "generator_lora")) == [DISTILLATION_FILE, LORA_WEIGHTS]
        for name in written:  # each export says how many steps to sample it with
            assert read_distillation_record(str(out / name)) == {"generator_steps": 4}


def test_trainer_refuses_bad_lora_targets_before_building_networks(pipeline_dir, tmp_path, world_of_one,
                                                                   monkeypatch):
    from adm_megatron.train.teacher import TeacherSource
    from adm_megatron.train.trainer import Trainer

    def never(*args, **kwargs):
        raise AssertionError("the networks were built before the LoRA targets were checked")

    monkeypatch.setattr(TeacherSource, "build_models", never)
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path}",
                                "model.lora.target_modules=[to_q, to_out.0]", "distill.head_every=1",
                                "logging.wandb_mode=disabled"])
    with pytest.raises(ConfigError, match="to_q targets only part of the fused layer"):
        Trainer(config)
    # a typo'd rank above the layers' width trained, with adapters larger than the weights they adapt
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path}", "model.lora.rank=100000",
                                "distill.head_every=1", "logging.wandb_mode=disabled"])
    with pytest.raises(ConfigError, match=r"^command line: model.lora.rank=100000: above the width of blocks\.0\.\S+ "
                                          r"\(in \d+, out \d+\); expected a rank <= \d+$"):
        with keys_located(config):
            Trainer(config)


def test_merged_bf16_weights_are_the_exact_sum_rounded_once(pipeline_dir, world_of_one):
    """With bf16 weights (``model.bf16_params``) the merged export's adapted weights are
    W + (alpha / r) B A computed exactly and rounded to bf16 once -- not the delta rounded to bf16
    first and the sum rounded again, which lands one bf16 step off wherever the first rounding
    crosses a tie. The adapters are small next to the weights, as a trained LoRA's are."""
    from adm_megatron.lora import apply_lora
    from adm_megatron.lora.merge import full_adapters, merged_full_state_dict
    from adm_megatron.models import build_model_from_hf

    model = build_model_from_hf(os.path.join(pipeline_dir, "transformer")).to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    adapters = apply_lora(model, LoraConfig(rank=4, alpha=12.0, target_modules=ALL_TARGETS), seed=1)
    _perturb(adapters)
    with torch.no_grad():
        for p in adapters.parameters():
            p.mul_(0.05)
    merged = merged_full_state_dict(model)
    for key, (a, b) in full_adapters(adapters).items():
        name = f"{adapters.targets[key].path}.weight"
        exact = base[name].double() + 3.0 * (b.double() @ a.double())
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], exact.to(torch.bfloat16)), name


def _double(values):
    if isinstance(values, (tuple, list)):
        return type(values)(_double(v) for v in values)
    return values.double() if torch.is_tensor(values) and values.is_floating_point() else values


@pytest.mark.parametrize("family", ["cogvideox", "sd3"])
def test_full_recompute_gives_a_lora_generator_the_gradients_it_gets_without(family, tmp_path, world_of_one):
    """Full recompute (megatron's reentrant checkpoint) on a LoRA model, whose frozen embeddings
    hand the blocks inputs that need no grad: the adapters get exactly the gradients they get
    without recompute (fp64; before the fix every adapter's gradient was None and a LoRA run with
    ``model.recompute`` trained nothing), and the frozen base gets none."""
    import tiny_sd3

    from adm_megatron.lora import apply_lora
    from adm_megatron.models import build_model_from_hf

    if family == "cogvideox":
        hf_dir, targets = save_diffusers_model("5b", str(tmp_path)), ALL_TARGETS
        inputs = _double(make_inputs(build_model_from_hf(hf_dir).arch, 2, 3, 4, 4))
        run, weight = (lambda m: _forward(m, inputs)), inputs[-1]
    else:
        hf_dir, targets = tiny_sd3.save_diffusers_model("sd3", str(tmp_path)), ALL_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj"]
        config = build_model_from_hf(hf_dir).arch
        latents, text, pooled, timestep, weight = _double(tiny_sd3.make_inputs(config, 2, 8, 8))
        run = lambda m: m(latents, text, pooled, timestep).sample  # noqa: E731
    grads = {}
    for recompute in (False, True):
        model = build_model_from_hf(hf_dir, recompute=recompute).double()
        adapters = apply_lora(model, LoraConfig(rank=2, alpha=4.0, target_modules=targets), seed=1)
        _perturb(adapters)  # B != 0, so that A's gradient is not zero either
        (run(model) * weight).sum().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("lora."))
        grads[recompute] = {n: p.grad for n, p in adapters.named_parameters()}
    assert grads[False] and all(g is not None and g.abs().max() > 0 for g in grads[False].values())
    for name, want in grads[False].items():
        assert grads[True][name] is not None, name
        torch.testing.assert_close(grads[True][name], want, rtol=1e-10, atol=1e-14, msg=name)
