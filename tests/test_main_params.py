"""bf16 weights with fp32 main params (``model.bf16_params``; megatron's Float16 optimizer approach):
the optimizer steps fp32 master copies with AdamW exactly as an fp32 AdamW on the same values and
gradients would, the bf16 weights are the master copies rounded, Adam's state is fp32, and the
checkpointed state carries the master copies (model space) so a reload restores them exactly."""

from __future__ import annotations

import math

import pytest
import torch


def _network(dtype, ddp_config=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from adm_megatron.train.single_stage import SingleStage

    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    module = SingleStage(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)), config)
    module.to(dtype)
    return DistributedDataParallel(config, ddp_config or DistributedDataParallelConfig(), module)


def _backward(ddp, dtype, seed):
    ddp.zero_grad_buffer()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ddp(x).float().pow(2).mean().backward()
    ddp.finish_grad_sync()


def test_bf16_params_step_fp32_masters_like_fp32_adamw(world_of_one):
    from adm_megatron.config import OptimizerConfig
    from adm_megatron.train.optimizer import NetworkOptimizer

    ddp = _network(torch.bfloat16)
    opt = NetworkOptimizer(ddp, OptimizerConfig(lr=1e-2, grad_clip=0.0), total_updates=3)
    assert opt.main.has_master_copy
    masters = [slot.main for slot in opt.main.slots]
    reference = [m.detach().clone().requires_grad_(True) for m in masters]
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.0)
    for seed in range(3):
        _backward(ddp, torch.bfloat16, seed)
        for ref, p in zip(reference, opt.params):
            ref.grad = p.main_grad.float()
        ref_opt.step()
        assert opt.step(skip_if_not_finite=False)[1]
        for ref, master, p in zip(reference, masters, opt.params):
            assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
            assert torch.equal(master, ref.detach())
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert all(t.dtype == torch.float32 for t in opt.state_tensors())
    state = opt._model_space_state()
    for i, master in enumerate(masters):
        assert torch.equal(state["state"][i]["main_param"], master)
    # a reload (over masters moved away) restores the fp32 masters exactly
    saved = {"optimizer": {**state, "state": {i: {k: v.clone() for k, v in s.items()}
                                              for i, s in state["state"].items()}},
             "step": state["state"][0]["step"], "scheduler": opt.scheduler.state_dict()}
    with torch.no_grad():
        for master in masters:
            master.add_(1.0)
    opt.load_sharded_state_dict(saved)
    for i, master in enumerate(masters):
        assert torch.equal(master, saved["optimizer"]["state"][i]["main_param"])
    assert any(not torch.equal(m.to(torch.bfloat16).float(), m) for m in masters)  # more than bf16 holds


def test_fp32_params_are_their_own_main_params(world_of_one):
    from adm_megatron.config import OptimizerConfig
    from adm_megatron.train.optimizer import NetworkOptimizer

    opt = NetworkOptimizer(_network(torch.float32), OptimizerConfig(), total_updates=1)
    assert not opt.main.has_master_copy
    assert all(slot.main is slot.param for slot in opt.main.slots)
    assert opt.state_numel() == 2 * sum(p.numel() for p in opt.params)


def test_a_nan_gradient_in_a_tensor_parallel_duplicate_is_not_stepped_unseen(world_of_one, monkeypatch):
    """On TP rank > 0 the norm leaves out the duplicates (norms, embeddings: TP rank 0's copy counts):
    a NaN in that rank's copy alone was stepped into its weights with a finite norm reported and
    ``skipped`` false, and the TP ranks' copies parted (seen with TP=2 on gloo: rank 1's weights NaN,
    rank 0's finite, the next losses NaN)."""
    import adm_megatron.train.optimizer as optimizer_module
    from adm_megatron.config import OptimizerConfig
    from adm_megatron.train.optimizer import NetworkOptimizer

    ddp = _network(torch.float32)
    opt = NetworkOptimizer(ddp, OptimizerConfig(lr=1e-2), total_updates=2)
    duplicate = opt.params[0]  # as a TP rank > 0 sees a layer norm's weight
    monkeypatch.setattr(optimizer_module, "param_is_not_tensor_parallel_duplicate", lambda p: p is not duplicate)
    monkeypatch.setattr(optimizer_module.parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    _backward(ddp, torch.float32, 0)
    duplicate.main_grad[0] = float("nan")
    before = [p.detach().clone() for p in opt.params]
    norm, stepped = opt.step(skip_if_not_finite=True)
    assert math.isnan(norm) and not stepped
    assert all(torch.equal(b, p) for b, p in zip(before, opt.params))
    assert opt.scheduler.num_steps == 0 and not opt.optimizer.state
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        opt.step(skip_if_not_finite=False)
    _backward(ddp, torch.float32, 1)  # finite again: the next update steps
    assert opt.step(skip_if_not_finite=True)[1]


def test_bf16_params_accumulate_and_reduce_their_gradients_in_fp32(world_of_one):
    """With bf16 weights (model.bf16_params) DDP's gradient buffer is fp32 (Megatron-LM's and NeMo's
    bf16 default): 8 accumulated micro-batches' gradients are their exact fp32 sum, where a bf16
    buffer rounds every partial sum; fp32 weights keep fp32 gradients, as before."""
    from adm_megatron.config import ParallelConfig
    from adm_megatron.train.grad_sync import ddp_config

    ddp = _network(torch.bfloat16, ddp_config(ParallelConfig(), False, fp32_grads=True))
    singles = []
    for seed in range(8):  # each micro-batch's gradient alone (a bf16 value, exact in fp32)
        _backward(ddp, torch.bfloat16, seed)
        singles.append([p.main_grad.clone() for p in ddp.module.parameters()])
    ddp.zero_grad_buffer()
    for seed in range(8):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        ddp(x).float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    for i, p in enumerate(ddp.module.parameters()):
        expected = singles[0][i]
        for single in singles[1:]:
            expected = expected + single[i]
        assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32
        assert torch.equal(p.main_grad, expected), i
    assert ddp_config(ParallelConfig(), False).grad_reduce_in_fp32 is False  # fp32 / fp64 weights: their own dtype



def _bf16_steps(sharded: bool) -> list[torch.Tensor]:
    """3 clipped AdamW updates of the bf16 test network with fp32 gradient buffers; update s takes the
    micro-batches of seeds 10 s and 10 s + 1: one each on the ranks of a world of 2 (rank r: 10 s + r),
    both accumulated in a world of one. Returns the weights."""
    import torch.distributed as dist

    from adm_megatron.config import OptimizerConfig, ParallelConfig
    from adm_megatron.parallel import initialize_parallel
    from adm_megatron.train.grad_sync import ddp_config
    from adm_megatron.train.optimizer import NetworkOptimizer

    if not dist.is_initialized():
        initialize_parallel(tensor_parallel=1, context_parallel=1, seed=0)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    ddp = _network(torch.bfloat16, ddp_config(ParallelConfig(), sharded, fp32_grads=True))
    opt = NetworkOptimizer(ddp, OptimizerConfig(lr=1e-2, grad_clip=0.05, shard_over_dp=sharded), total_updates=3)
    norms = []
    for step in range(3):
        ddp.zero_grad_buffer()
        seeds = [10 * step + rank] if ranks == 2 else [10 * step, 10 * step + 1]
        for seed in seeds:
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
            (ddp(x).float().pow(2).mean() / len(seeds)).backward()  # (DDP averages over the DP ranks)
        ddp.finish_grad_sync()
        norm, stepped = opt.step(skip_if_not_finite=False)
        assert stepped
        norms.append(norm)
    return [norms, *(p.detach().clone() for p in ddp.module.parameters())]


def test_bf16_params_with_fp32_grads_sharded_over_dp2_equal_one_process(world_of_one):
    """bf16 weights, fp32 gradient buffers (the GPU default) and the optimizer state sharded over
    DP = 2 (gloo: megatron DDP reduce-scatters the fp32 buffer, each rank steps the fp32 masters of
    its half, the bf16 weights are all-gathered): after 3 clipped updates both ranks hold the weights
    one process reaches with both micro-batches accumulated, bit for bit (halving and adding two fp32
    values is exact in any order), and clipping saw the same gradient norms."""
    from multiproc import run_world

    one = _bf16_steps(False)
    world = run_world(_bf16_steps, 2, True, timeout_s=300)
    for rank in world:
        assert rank[0] == pytest.approx(one[0], rel=1e-5) and one[0][0] > 0.05  # clipped
        for mine, theirs in zip(rank[1:], one[1:]):
            assert mine.dtype == torch.bfloat16
            assert torch.equal(mine, theirs)
    assert any(not torch.equal(a, b) for a, b in zip(one[1:], _network(torch.bfloat16).module.parameters()))
