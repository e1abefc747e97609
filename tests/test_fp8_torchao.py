"""``model.fp8=tensorwise | rowwise | rowwise_with_gw_hp``: torchao's FP8 GEMMs in the local spec's
linears (models/fp8_torchao.py), on CPU (torch computes the same scaled GEMMs there).

- Every block linear's forward GEMM and its FP8 backward GEMMs (two, or one with the weight gradient
  in high precision) multiply FP8 operands, and nothing else does: counted in a dispatch mode.
- The result is FP8's: within a few per cent of the same model without FP8 and not equal to it.
- Data parallel (2 gloo processes) equals one process that runs the same micro-batches one after the
  other, for every recipe (fp32 summation order: 1e-5).
- The config refuses what cannot run, in one line.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adm_megatron.config import ConfigError, load_config
from adm_megatron.models.fp8_torchao import cpu_has_rowwise_scaled_mm
from multiproc import run_world
from tiny_cogvideox import rel_err, save_diffusers_model

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# the recipes this torch computes on the CPU (torch 2.11's CPU ``_scaled_mm`` has per-tensor scales only,
# and model.fp8=rowwise* is refused there: test_machine_checks); CI's torch 2.13 runs all three
CPU_RECIPES = RECIPES if cpu_has_rowwise_scaled_mm() else ("tensorwise",)
SIZE = (3, 4, 12)  # latent frames x height x width: 18 video tokens (+16 text)


class _CountFloat8MM(TorchDispatchMode):
    """Matrix products whose operands are FP8 (torchao's float8 tensors, which run ``_scaled_mm``)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor

        if func is torch.ops.aten.mm.default and all(isinstance(a, Float8TrainingTensor) for a in args[:2]):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_diffusers_model("5b", str(tmp_path_factory.mktemp("hf")))


def _inputs(hf_dir):
    from parallel_parity import FAMILIES

    _, build, _, _, latents, weight, call = FAMILIES["cogvideox"](hf_dir, SIZE)
    return build, latents, weight, call


def _forward_backward(model, call, latents, weight, share):
    x = latents[share].clone().requires_grad_(True)
    out = call(model, x, share)
    (out * weight[share]).sum().backward()
    return out.detach(), x.grad


def _block_linears(model):
    from adm_megatron.models.linears import LocalWhenAlone

    return [m for m in model.blocks.modules() if isinstance(m, LocalWhenAlone)]


@pytest.mark.parametrize("recipe", [r if r in CPU_RECIPES else pytest.param(
    r, marks=pytest.mark.skip(reason=f"torch {torch.__version__}: no per-row FP8 scales on the CPU")) for r in RECIPES])
def test_block_linears_compute_in_fp8(world_of_one, hf_dir, recipe):
    from adm_megatron.models.fp8_torchao import enable_local_fp8

    build, latents, weight, call = _inputs(hf_dir)
    plain, fp8 = build(hf_dir), build(hf_dir)
    assert enable_local_fp8(fp8, recipe) == len(_block_linears(fp8)) == 8  # 2 blocks: qkv, proj, fc1, fc2
    with _CountFloat8MM() as unconverted:
        out_plain, dx_plain = _forward_backward(plain, call, latents, weight, slice(None))
    assert unconverted.calls == 0

    x = latents.clone().requires_grad_(True)
    with _CountFloat8MM() as forward:
        out = call(fp8, x, slice(None))
    with _CountFloat8MM() as backward:
        (out * weight).sum().backward()
    assert forward.calls == 8
    assert backward.calls == 8 * (1 if recipe == "rowwise_with_gw_hp" else 2)

    assert 1e-4 < rel_err(out.detach(), out_plain) < 0.1
    assert 1e-4 < rel_err(x.grad, dx_plain) < 0.2
    grads = dict(fp8.named_parameters())
    errors = {name: rel_err(grads[name].grad, param.grad) for name, param in plain.named_parameters()}
    assert max(errors.values()) < 0.3, errors


def test_fp8_follows_bf16_autocast(world_of_one, hf_dir):
    from adm_megatron.models.fp8_torchao import enable_local_fp8

    build, latents, weight, call = _inputs(hf_dir)
    plain, fp8 = build(hf_dir), build(hf_dir)
    enable_local_fp8(fp8, CPU_RECIPES[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain = call(plain, latents, slice(None))
        out = call(fp8, latents, slice(None))
    assert out.dtype == out_plain.dtype == torch.bfloat16
    assert 1e-4 < rel_err(out.float(), out_plain.float()) < 0.1


def _data_parallel_against_one_process(hf_dir):
    """In each of 2 ranks, for each recipe: one process's result (no communication: its micro-batches
    one after the other), then data parallelism's; the largest relative errors come back by recipe
    (one world for the three: each costs start-up)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from adm_megatron.models.fp8_torchao import enable_local_fp8
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    build, latents, weight, call = _inputs(hf_dir)
    info = initialize_parallel(seed=7)
    share = slice(info.dp_rank, info.dp_rank + 1)
    by_recipe = {}
    for recipe in CPU_RECIPES:
        reference = build(hf_dir)
        enable_local_fp8(reference, recipe)
        ref = [_forward_backward(reference, call, latents, weight, slice(i, i + 1)) for i in range(2)]
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        model = build(hf_dir)
        enable_local_fp8(model, recipe)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        out, dx = _forward_backward(ddp, call, latents, weight, share)
        finalize_model_grads([ddp])
        errors = {"out": rel_err(out, ref[info.dp_rank][0]), "dx": rel_err(dx, ref[info.dp_rank][1])}
        for name, param in model.named_parameters():
            errors[name] = rel_err(param.main_grad * info.dp_size, ref_grads[name])  # undo DP's mean
        by_recipe[recipe] = errors
    destroy_parallel()
    return by_recipe


def test_data_parallel_equals_one_process_over_the_same_micro_batches(hf_dir):
    for by_recipe in run_world(_data_parallel_against_one_process, 2, hf_dir):
        assert set(by_recipe) == set(CPU_RECIPES)
        for recipe, errors in by_recipe.items():
            worst = max(errors, key=errors.get)
            assert errors[worst] <= 1e-5, (recipe, worst, errors[worst])


@pytest.mark.parametrize("overrides, message", [
    (["model.fp8=rowwise", "model.impl=te"], "model.fp8=rowwise runs in the local spec's linears, not with model.impl=te"),
    (["model.fp8=tensorwise", "parallel.tensor_parallel=2"],
     "model.fp8=tensorwise computes in FP8 where a linear communicates nothing, one tensor-parallel rank"),
    (["model.fp8=rowwise_with_gw_hp", "parallel.context_parallel=2"],
     "model.fp8=rowwise_with_gw_hp with parallel.context_parallel=2: each rank's copy of the text tokens"),
    (["model.fp8=rowwise_with_gw_hp", "model.dtype=fp64"], "model.fp8=rowwise_with_gw_hp with model.dtype=fp64"),
])
def test_config_refuses_what_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["model.teacher=/x", *overrides])
    assert load_config(None, ["model.teacher=/x", "model.fp8=tensorwise"]).model.fp8 == "tensorwise"


def test_machine_checks(monkeypatch):
    import sys

    from adm_megatron.models.fp8_torchao import check_local_fp8

    from adm_megatron.models import fp8_torchao

    check_local_fp8("tensorwise", "local", None)  # CPU: torch's scaled GEMMs
    monkeypatch.setattr(fp8_torchao, "cpu_has_rowwise_scaled_mm", lambda: True)
    check_local_fp8("rowwise", "local", None)
    monkeypatch.setattr(fp8_torchao, "cpu_has_rowwise_scaled_mm", lambda: False)  # torch 2.11
    with pytest.raises(ValueError, match=r"model.fp8=rowwise: this torch \(.*\) multiplies FP8 on the CPU with "
                                         r"per-tensor scales only"):
        check_local_fp8("rowwise", "local", None)
    check_local_fp8("rowwise", "local", (9, 0))  # a GPU's scaled GEMMs take per-row scales
    monkeypatch.undo()
    check_local_fp8("tensorwise", "local", (9, 0))  # an H100 / H200
    check_local_fp8("hybrid", "te", None)  # Transformer Engine's recipe: not this module's
    with pytest.raises(ValueError, match="this run builds Transformer Engine's"):
        check_local_fp8("rowwise", "te", (9, 0))
    with pytest.raises(ValueError, match=r"compute capability 8.0\) has no FP8 tensor cores"):
        check_local_fp8("rowwise", "local", (8, 0))
    monkeypatch.setitem(sys.modules, "torchao.float8.float8_linear", None)  # torchao absent
    with pytest.raises(ValueError, match=r"model.fp8=rowwise needs torchao's float8 training \(pip install"):
        check_local_fp8("rowwise", "local", None)


def test_a_run_trains_every_backbone_in_fp8(world_of_one, tmp_path):
    import math

    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.trainer import Trainer

    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    config = load_config(None, [
        f"model.teacher={pipeline}", f"output_dir={tmp_path / 'run'}", "model.fp8=tensorwise",
        "data.num_prompts=2", "data.batch_size=2", "data.frames=2", "data.height=4", "data.width=4",
        "distill.generator_steps=2", "distill.head_every=1", "distill.head_hidden=16", "train.max_iterations=1",
        "train.num_samples=0", "train.export=false", "logging.wandb_mode=disabled", "logging.progress=false"])
    trainer = Trainer(config)
    n = trainer.networks
    for network in (n.teacher, n.fake_score, n.generator):  # the teacher is the discriminator's backbone too
        linears = _block_linears(network.module.module if hasattr(network.module, "module") else network.module)
        assert linears and all(linear.fp8_gemm.recipe == "tensorwise" for linear in linears)
    metrics = trainer.train_iteration(0)
    losses = {k: v for k, v in metrics.items() if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
