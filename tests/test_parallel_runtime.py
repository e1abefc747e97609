"""adm_megatron.parallel: process groups from the launcher env, the CPU shim, megatron on gloo.

One 4-process world (tp=2 x cp=2, then re-initialized as tp=2 x dp=2) runs all multi-rank
checks; the rest is in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from adm_megatron.parallel import (
    ParallelInfo,
    cpu_shim_active,
    destroy_parallel,
    ensure_parallel,
    expand_nodelist,
    get_device,
    initialize_parallel,
    launch_env,
    parallel_info,
    slurm_batch_shell_tasks,
)
from multiproc import run_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# helpers that run inside the ranks


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _close(a, b, what, atol=1e-6):
    if not torch.allclose(a, b, atol=atol, rtol=1e-5):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3e}")


def _group_ranks(group):
    return dist.get_process_group_ranks(group)


def _gather(t, group):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _check_sequence_parallel_mappings(info):
    from megatron.core import tensor_parallel as mtp

    x = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(8, 2, 3)
    chunk = x.chunk(info.tp_size, dim=0)[info.tp_rank]
    _close(mtp.scatter_to_sequence_parallel_region(x), chunk, "scatter_to_sequence_parallel")

    local = chunk.clone().requires_grad_()
    full = mtp.gather_from_sequence_parallel_region(local)
    _close(full, x, "gather_from_sequence_parallel")
    (full * (info.tp_rank + 1)).sum().backward()  # backward reduce-scatters: sum of (r + 1)
    _close(local.grad, torch.full_like(chunk, 3.0), "gather backward (reduce-scatter)")

    rs = mtp.reduce_scatter_to_sequence_parallel_region(x * (info.tp_rank + 1))
    _close(rs, chunk * 3.0, "reduce_scatter_to_sequence_parallel")


def _check_column_parallel_sp(info):
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=info.tp_size,
        context_parallel_size=info.cp_size,
        sequence_parallel=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    layer = ColumnParallelLinear(
        6, 8, config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False
    )
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4, dtype=torch.float32) + 4 * info.tp_rank)
    tp_group = ps.get_tensor_model_parallel_group()
    w_full = torch.cat(_gather(layer.weight.detach(), tp_group), dim=0)  # [8, 6]
    b_full = torch.cat(_gather(layer.bias.detach(), tp_group), dim=0)

    g = torch.Generator().manual_seed(7)
    x_full = torch.randn(8, 2, 6, generator=g)  # [s, b, h], the same on every rank
    grad_out = torch.randn(8, 2, 8, generator=g)
    sl = slice(4 * info.tp_rank, 4 * (info.tp_rank + 1))

    x_local = x_full.chunk(info.tp_size, dim=0)[info.tp_rank].clone().requires_grad_()
    y, _ = layer(x_local)
    assert y.shape == (8, 2, 4), y.shape  # sequence gathered, output columns split
    (y * grad_out[..., sl]).sum().backward()

    x_ref = x_full.clone().requires_grad_()
    w_ref = w_full.clone().requires_grad_()
    y_ref = x_ref @ w_ref.t() + b_full
    (y_ref * grad_out).sum().backward()

    _close(y, y_ref[..., sl], "ColumnParallelLinear(SP) forward", atol=1e-5)
    _close(
        x_local.grad,
        x_ref.grad.chunk(info.tp_size, dim=0)[info.tp_rank],
        "ColumnParallelLinear(SP) input grad",
        atol=1e-5,
    )
    _close(layer.weight.grad, w_ref.grad[sl], "ColumnParallelLinear(SP) weight grad", atol=1e-5)


def _dropout_block(x):
    from megatron.core import tensor_parallel as mtp

    with mtp.get_cuda_rng_tracker().fork():
        h = torch.nn.functional.dropout(x, p=0.5, training=True)
    return h * x + torch.nn.functional.dropout(x, p=0.5, training=True)


def _check_activation_recompute():
    from megatron.core import tensor_parallel as mtp

    tracker = mtp.get_cuda_rng_tracker()
    x = torch.randn(16, 4, requires_grad=True)
    cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()
    y = mtp.checkpoint(_dropout_block, False, x)
    y.sum().backward()

    torch.set_rng_state(cpu_state)
    tracker.set_states(tracker_states)
    x2 = x.detach().clone().requires_grad_()
    y2 = _dropout_block(x2)
    y2.sum().backward()
    _close(y, y2, "checkpointed forward")
    _close(x.grad, x2.grad, "checkpointed backward (same dropout masks on recompute)")


def _check_ddp_grad_average(info, module, x):
    """Wrap `module` in megatron DDP; main_grad after finish_grad_sync == DP(-CP) mean of grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=info.tp_size,
        tensor_model_parallel_size=info.tp_size,
        context_parallel_size=info.cp_size,
        use_cpu_initialization=True,
    )
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module
    )
    out = ddp(x)
    out = out[0] if isinstance(out, tuple) else out
    (out**2).sum().backward()
    # megatron's backward hooks move each local grad into param.main_grad (p.grad -> None)
    local = {
        n: (p.grad if p.grad is not None else p.main_grad).detach().clone()
        for n, p in module.named_parameters()
    }
    ddp.finish_grad_sync()
    group = ps.get_data_parallel_group(with_context_parallel=True)
    checked = 0
    for n, p in module.named_parameters():
        expect = torch.stack(_gather(local[n], group)).mean(0)
        _close(p.main_grad, expect, f"DDP main_grad of {n} (mean over {group.size()} ranks)")
        others = _gather(p.main_grad, group)
        assert all(torch.equal(o, others[0]) for o in others), n
        checked += 1
    return checked, group.size()


def _four_rank_world(ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as mtp

    counter = _Count()
    logging.getLogger("adm_megatron").addHandler(counter)
    logging.getLogger("adm_megatron").setLevel(logging.INFO)
    out = {}

    # ---- layout A: tp=2 x cp=2 (dp=1) --------------------------------------------------------
    info = initialize_parallel(tensor_parallel=2, context_parallel=2, seed=1234)
    out["info_a"] = info
    assert initialize_parallel(2, 2) is info
    assert ensure_parallel() is info and parallel_info() is info
    try:
        initialize_parallel(tensor_parallel=4, context_parallel=1)
    except ValueError as e:
        out["relayout_error"] = str(e)
    out["groups_a"] = {
        "tp": _group_ranks(ps.get_tensor_model_parallel_group()),
        "cp": _group_ranks(ps.get_context_parallel_group()),
        "dp": _group_ranks(ps.get_data_parallel_group()),
        "dp_cp": _group_ranks(ps.get_data_parallel_group(with_context_parallel=True)),
    }

    # TP all-reduce (plain and through megatron's mapping)
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    out["tp_allreduce"] = t.item()
    out["tp_allreduce_mcore"] = mtp.reduce_from_tensor_model_parallel_region(
        torch.tensor([float(info.rank + 1)])
    ).item()

    # the shim: devices, RNG tracker streams, memory buffer
    out["shim"] = cpu_shim_active()
    out["current_device"] = torch.cuda.current_device()
    with mtp.get_cuda_rng_tracker().fork():
        out["rand_tp"] = torch.rand(4)
    out["rand_default"] = torch.rand(4)
    buf = ps.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "test")
    out["buffer_device"] = str(buf.device)
    torch.cuda.synchronize()

    _check_sequence_parallel_mappings(info)
    _check_column_parallel_sp(info)
    _check_activation_recompute()
    # DDP over the dp x cp group (here: the CP pair), on a replicated (non-TP) module
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 3)
    out["ddp_a"] = _check_ddp_grad_average(info, lin, torch.randn(5, 8) + info.rank)

    # ---- layout B: destroy and re-initialize as tp=2 x dp=2 ----------------------------------
    destroy_parallel()
    assert not dist.is_initialized()
    info = initialize_parallel(tensor_parallel=2, context_parallel=1, seed=99)
    out["info_b"] = info
    out["groups_b_dp"] = _group_ranks(ps.get_data_parallel_group())

    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    col = ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_, bias=True)
    out["ddp_b"] = _check_ddp_grad_average(info, col, torch.randn(4, 8) + info.rank)

    # dist_checkpointing save / load of a TP-sharded layer
    meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    col2 = ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_, bias=True)
    with torch.no_grad():
        col2.bias.copy_(torch.arange(3.0) + 10 * info.tp_rank)
    dist_checkpointing.save(col2.sharded_state_dict(metadata=meta), ckpt_dir)
    saved_w, saved_b = col2.weight.detach().clone(), col2.bias.detach().clone()
    with torch.no_grad():
        col2.weight.zero_()
        col2.bias.zero_()
    loaded = dist_checkpointing.load(col2.sharded_state_dict(metadata=meta), ckpt_dir)
    col2.load_state_dict(loaded)
    _close(col2.weight, saved_w, "dist_checkpointing weight round trip")
    _close(col2.bias, saved_b, "dist_checkpointing bias round trip")

    # apply twice more: still one log line
    from adm_megatron.parallel import apply_cpu_shim

    assert apply_cpu_shim() is True
    out["shim_log_lines"] = sum("CPU shim on" in m for m in counter.messages)
    out["cuda_queued_calls"] = len(torch.cuda._queued_calls)
    destroy_parallel()
    return out


# --------------------------------------------------------------------------------------------
# tests


def test_four_ranks_tp2_cp2_then_tp2_dp2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    results = run_world(_four_rank_world, 4, str(tmp_path / "ckpt"), timeout_s=240)

    for rank, r in enumerate(results):
        a = r["info_a"]
        assert isinstance(a, ParallelInfo)
        assert (a.rank, a.world_size, a.local_rank) == (rank, 4, rank)
        assert (a.tp_size, a.cp_size, a.dp_size) == (2, 2, 1)
        assert (a.tp_rank, a.cp_rank, a.dp_rank) == (rank % 2, rank // 2, 0)
        assert a.device == torch.device("cpu") and a.backend == "gloo"
        assert "tp=2, cp=2" in r["relayout_error"] and "tp=4, cp=1" in r["relayout_error"]
        assert "\n" not in r["relayout_error"]
        g = r["groups_a"]
        assert g["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert g["cp"] == [rank % 2, rank % 2 + 2]
        assert g["dp"] == [rank] and g["dp_cp"] == g["cp"]
        pair = rank - rank % 2
        assert r["tp_allreduce"] == r["tp_allreduce_mcore"] == (pair + 1) + (pair + 2)

        assert r["shim"] is True and r["current_device"] == "cpu"
        assert r["buffer_device"] == "cpu"
        assert r["shim_log_lines"] == 1
        assert r["cuda_queued_calls"] < 10  # the RNG tracker does not queue lazy CUDA calls

        assert r["ddp_a"] == (2, 2)  # weight and bias, averaged over the CP pair
        b = r["info_b"]
        assert (b.tp_size, b.cp_size, b.dp_size) == (2, 1, 2)
        assert (b.tp_rank, b.dp_rank) == (rank % 2, rank // 2)
        assert r["groups_b_dp"] == [rank % 2, rank % 2 + 2]
        assert r["ddp_b"] == (2, 2)

    # model_parallel_cuda_manual_seed through the shim: the TP stream differs across TP ranks
    # and repeats across CP ranks; the default stream is the same everywhere
    rt = [r["rand_tp"] for r in results]
    rd = [r["rand_default"] for r in results]
    assert not torch.equal(rt[0], rt[1])
    assert torch.equal(rt[0], rt[2]) and torch.equal(rt[1], rt[3])
    assert all(torch.equal(rd[0], x) for x in rd)
    assert not torch.equal(rt[0], rd[0])


def _one_rank_asks_for_another_layout():
    """Rank 1 asks for TP=2 where rank 0 asks for TP=1: what each rank raised."""
    rank = launch_env().rank
    try:
        initialize_parallel(tensor_parallel=1 + rank, timeout_s=60)
    except Exception as error:  # noqa: BLE001 -- the test looks at which
        return type(error).__name__, str(error)
    return None


def test_ranks_that_ask_for_different_layouts_stop_in_one_line_at_once():
    """Before, each rank made megatron's groups for its own layout and waited in them until
    parallel.timeout_s (600 s by default), then ended on a gloo traceback."""
    import time

    start = time.monotonic()
    (name0, message0), (name1, _) = run_world(_one_rank_asks_for_another_layout, 2, timeout_s=120)
    assert time.monotonic() - start < 50  # the collectives' timeout is 60 s
    assert (name0, name1) == ("ConfigError", "FailedElsewhere")
    assert message0 == ("parallel.tensor_parallel x parallel.context_parallel differ between the ranks: rank 0 1 x 1 "
                        "but rank 1: 2 x 1: give every rank the same config file and overrides")


def test_world_of_one(world_of_one):
    info = world_of_one
    assert info == ParallelInfo(
        rank=0,
        world_size=1,
        local_rank=0,
        tp_size=1,
        tp_rank=0,
        cp_size=1,
        cp_rank=0,
        dp_size=1,
        dp_rank=0,
        device=torch.device("cpu"),
        backend="gloo",
    )
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert parallel_info() is info and ensure_parallel() is info
    assert initialize_parallel() is info
    assert get_device() == torch.device("cpu")
    with pytest.raises(ValueError, match=r"tp=1, cp=1.*tp=2, cp=1"):
        initialize_parallel(tensor_parallel=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 3

    from megatron.core import tensor_parallel as mtp

    if not torch.cuda.is_available():
        assert cpu_shim_active() and torch.cuda.current_device() == "cpu"
    with mtp.get_cuda_rng_tracker().fork():
        torch.rand(2)
    y = mtp.checkpoint(lambda t: t * 2, False, torch.ones(3, requires_grad=True))
    y.sum().backward()


def test_destroy_and_uninitialized_errors(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    destroy_parallel()
    destroy_parallel()  # twice is fine
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        parallel_info()
    info = ensure_parallel()  # nothing there: a world of one
    assert info.world_size == 1 and dist.is_initialized()
    destroy_parallel()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        parallel_info()


@pytest.mark.parametrize(
    "env, tp, cp, numbers",
    [
        ({"RANK": "0", "WORLD_SIZE": "6", "LOCAL_RANK": "0"}, 4, 1, ["6", "4"]),
        ({"RANK": "1", "WORLD_SIZE": "6", "LOCAL_RANK": "1"}, 2, 2, ["6", "2 x 2 = 4"]),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "n1", "SLURM_STEP_ID": "0"}, 2, 1, ["3", "2"]),
    ],
)
def test_bad_layout_raises_before_any_process_group(monkeypatch, env, tp, cp, numbers):
    destroy_parallel()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # a master nobody listens on: if a process group were attempted, this would hang / fail
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "9")
    with pytest.raises(ValueError) as err:
        initialize_parallel(tensor_parallel=tp, context_parallel=cp, timeout_s=5)
    msg = str(err.value)
    assert "\n" not in msg and "not divisible" in msg
    for n in numbers:
        assert n in msg
    assert not dist.is_initialized()


@pytest.mark.parametrize("tp, cp", [(0, 1), (1, 0), (-2, 1)])
def test_nonpositive_sizes_rejected(tp, cp):
    destroy_parallel()
    with pytest.raises(ValueError, match="positive"):
        initialize_parallel(tensor_parallel=tp, context_parallel=cp)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("x-[5]-y,z[1-2]", ["x-5-y", "z1", "z2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_launch_env_sources():
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",  # srun started this task
    }
    le = launch_env(slurm)
    assert (le.rank, le.world_size, le.local_rank, le.source) == (5, 8, 1, "slurm")
    assert le.master_addr == "gpu07"
    assert le.master_port == 15000 + 123456 % 10000

    le = launch_env(dict(slurm, MASTER_ADDR="head", MASTER_PORT="2222"))
    assert (le.master_addr, le.master_port) == ("head", 2222)
    no_job_list = {k: v for k, v in slurm.items() if k != "SLURM_JOB_NODELIST"}
    le = launch_env(no_job_list | {"SLURM_NODELIST": "a[3-4]"})
    assert le.master_addr == "a3"

    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "m",
        "MASTER_PORT": "29400",
    }
    le = launch_env(torchrun | slurm)  # torchrun inside an srun step: torchrun's variables win
    assert (le.rank, le.world_size, le.local_rank, le.source) == (3, 4, 3, "torchrun")
    assert (le.master_addr, le.master_port) == ("m", 29400)

    le = launch_env({})
    assert (le.rank, le.world_size, le.local_rank, le.source) == (0, 1, 0, "single")
    # the batch script of an 8-task job (SLURM_PROCID=0, SLURM_NTASKS=8, no step id) is one process:
    # read as rank 0 of 8 it waited for ranks nobody starts
    batch = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    le = launch_env(batch)
    assert (le.rank, le.world_size, le.source) == (0, 1, "single")
    assert slurm_batch_shell_tasks(batch) == 8
    assert slurm_batch_shell_tasks(slurm) == 0 and slurm_batch_shell_tasks(torchrun | batch) == 0
    assert slurm_batch_shell_tasks(batch | {"SLURM_NTASKS": "1"}) == 0
    assert launch_env(batch | {"SLURM_STEPID": "0"}).world_size == 8  # the older name of the step id

    with pytest.raises(ValueError, match="RANK"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_cpu_shim_is_noop_when_cuda_exists():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "orig = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize)\n"
        "from adm_megatron.parallel.cpu_shim import apply_cpu_shim, cpu_shim_active\n"
        "assert apply_cpu_shim() is False and not cpu_shim_active()\n"
        "assert (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize) == orig\n"
        "import sys; assert 'megatron.core' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
