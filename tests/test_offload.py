"""Offload of idle networks (``optim.<network>.offload``): three ADM iterations with every network's
optimizer state and weights offloaded are bit-identical to the same run without offload (losses
and every weight), and during each phase the networks it does not update keep their optimizer
state in the host buffers -- read from the tensors' storage -- and their gradient buffers released,
while the weights of networks the phase does not run (learned from the previous iteration) wait on
the host too, their storage released in place: no parameter is given another tensor as its data,
and each keeps the autograd gradient accumulator megatron DDP hooked."""

from __future__ import annotations

import pytest
import torch

COMMON = [
    "data.num_prompts=4", "data.frames=2", "data.height=4", "data.width=4", "data.batch_size=2",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    "train.max_iterations=3", "train.num_samples=0", "train.export=false",
    "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-3", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
]
NETWORKS = ("fake_score", "generator", "discriminator")
OFFLOAD = [f"optim.{n}.offload=optimizer_and_params" for n in NETWORKS]


def _run(pipeline_dir: str, output_dir: str, overrides: list[str]):
    from adm_megatron.config import load_config
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON, *overrides])
    trainer = Trainer(config)
    places = []  # (iteration, phase, {network: where}) seen as each phase's loss starts
    alg = trainer.algorithm
    for phase, attr in (("fake_score", "fake_score_loss"), ("generator", "generator_loss"),
                        ("discriminator", "discriminator_loss")):
        def record(*args, _phase=phase, _loss=getattr(alg, attr)):
            places.append((_phase, {n: trainer.offload.where(n) for n in trainer.offload.modes}))
            return _loss(*args)
        setattr(alg, attr, record)
    # a parameter given another tensor as its .data (on a GPU: another device's) loses its autograd
    # gradient accumulator, which megatron DDP hooked: its gradients would never reach main_grad
    assigned, data = [], torch.Tensor.data
    accumulators = {id(p): p.view_as(p).grad_fn.next_functions[0][0] for net in trainer.trainable.values()
                    for p in net.module.parameters()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Parameter, "data", property(data.__get__, lambda p, v: (
            assigned.append(tuple(p.shape)), data.__set__(p, v))), raising=False)
        losses = [{k: v for k, v in trainer.train_iteration(i).items() if k.endswith("/loss")} for i in range(3)]
    trainer.offload.restore_weights()
    assert assigned == []
    assert all(p.view_as(p).grad_fn.next_functions[0][0] is accumulators[id(p)]
               for net in trainer.trainable.values() for p in net.module.parameters())
    weights = {f"{p}.{n}": w.detach().clone() for p, net in trainer.trainable.items()
               for n, w in net.module.named_parameters()}
    return losses, weights, places


def test_offload_is_bit_identical_and_idle_state_waits_on_the_host(tmp_path, world_of_one):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    ref_losses, ref_weights, ref_places = _run(pipeline_dir, str(tmp_path / "off"), [])
    losses, weights, places = _run(pipeline_dir, str(tmp_path / "on"), OFFLOAD)
    assert ref_places == [(p, {}) for p, _ in places]  # nothing is offloaded without the setting
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    for name, want in ref_weights.items():
        assert torch.equal(weights[name], want), name
    assert [p for p, _ in places] == list(NETWORKS) * 3
    for i, (phase, where) in enumerate(places):
        iteration = i // 3
        for name in NETWORKS:
            expected_state = "device" if name == phase else "host"
            assert where[name]["optimizer"] == expected_state, (iteration, phase, name, where)
            assert where[name]["grads"] == ("device" if name == phase else "released"), (iteration, phase, name)
        # weights of a network the phase did not run the iteration before wait on the host
        runs = {"fake_score": {"fake_score", "generator"}, "generator": set(NETWORKS),
                "discriminator": {"discriminator"}}[phase]
        for name in NETWORKS:
            expected_params = "device" if iteration == 0 or name in runs else "host"
            assert where[name]["params"] == expected_params, (iteration, phase, name, where)


def test_a_checkpoint_reads_offloaded_optimizer_states_only_after_their_copies_land(tmp_path, world_of_one,
                                                                                     monkeypatch):
    """With CUDA the offload copies to host run on a side stream that the CPU does not wait for, and a
    checkpoint taken after an iteration writes the optimizer states offloaded at the start of its last
    phase from their host buffers: it must first wait for those copies (``Offloader.settle``), or it
    may write half-copied moments. The order is checked here (on CPU the copies are synchronous);
    tools/gpu_check.py's ``offload`` section shows the race on a GPU."""
    from megatron.core import dist_checkpointing

    from adm_megatron.config import load_config
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
    from adm_megatron.train.checkpoint import save_training_checkpoint
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path / 'run'}", *COMMON, *OFFLOAD])
    trainer = Trainer(config)
    trainer.train_iteration(0)
    events = []
    settle, save = trainer.offload.mover.settle, dist_checkpointing.save
    monkeypatch.setattr(trainer.offload.mover, "settle", lambda: (events.append("settle"), settle())[1])
    monkeypatch.setattr(dist_checkpointing, "save", lambda *a, **k: (
        events.append(("save", trainer.offload.where("generator")["optimizer"])), save(*a, **k))[1])
    save_training_checkpoint(trainer, 1)
    saves = [i for i, e in enumerate(events) if e != "settle"]
    assert ("save", "host") in events  # the generator's moments are written from the host buffers
    assert "settle" in events and events.index("settle") < saves[0], events


class LateCopies:
    """CUDA's offload hazards made visible on the CPU, where copies are synchronous and nothing is
    freed while referenced: a copy to the host lands, as far as the CPU can tell, only at ``settle``
    (the device sees it in order: a copy back to the device lands it first), its host buffer reads NaN
    until then; once landed, an optimizer state's device storage it left is NaN (CUDA frees and reuses
    it; a parameter's is released outright); a host buffer copied back to the device reads NaN (its
    value is stale from then on); and a released gradient buffer is kept filled with a sentinel that
    must still be there when it is restored (CUDA would have written into freed memory)."""

    SENTINEL = 12345.0

    def __init__(self, monkeypatch):
        from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel

        from adm_megatron.train.offload import HostMover, Offloader

        # id(host buffer) -> (it, the value on its way, the storage left: None for a parameter's)
        self.pending, self.written_while_released = {}, []
        to_host, to_device = HostMover.to_host, HostMover.to_device
        late = self

        @torch.no_grad()
        def late_to_host(mover, tensors):
            leaving = [(t, t.detach().clone(), None if isinstance(t, torch.nn.Parameter) else t.data)
                       for t in tensors if t.numel() and not mover.is_on_host(t)]
            to_host(mover, tensors)
            for t, value, old in leaving:
                mover.host[id(t)].fill_(float("nan"))
                late.pending[id(mover.host[id(t)])] = (mover.host[id(t)], value, old)

        @torch.no_grad()
        def late_to_device(mover, tensors):
            hosts = [mover.host[id(t)] for t in tensors if mover.is_on_host(t)]
            late.land(hosts)
            to_device(mover, tensors)
            for host in hosts:
                host.fill_(float("nan"))

        def release(ddp, synchronize=True, empty_cache=True):
            for buffer in ddp.buffers:
                buffer.grad_data.fill_(self.SENTINEL)
                buffer.released = True

        def restore(ddp, synchronize=True):
            for buffer in ddp.buffers:
                if getattr(buffer, "released", False):
                    self.written_while_released += [int((buffer.grad_data != self.SENTINEL).sum())]
                    buffer.grad_data.zero_()
                    buffer.released = False

        monkeypatch.setattr(HostMover, "to_host", late_to_host)
        monkeypatch.setattr(HostMover, "to_device", late_to_device)
        monkeypatch.setattr(HostMover, "settle", lambda mover: late.land())
        monkeypatch.setattr(DistributedDataParallel, "offload_grad_buffers", release)
        monkeypatch.setattr(DistributedDataParallel, "restore_grad_buffers", restore)
        monkeypatch.setattr(Offloader, "_grads_released", lambda offloader, name: any(
            getattr(b, "released", False) for b in offloader.networks[name].module.buffers))

    @torch.no_grad()
    def land(self, hosts=None):
        """The pending copies into ``hosts`` (all: None) land."""
        for key in list(self.pending) if hosts is None else [id(h) for h in hosts if id(h) in self.pending]:
            host, value, old = self.pending.pop(key)
            host.copy_(value)
            if old is not None:
                old.fill_(float("nan"))


def _checkpointed_run(pipeline_dir: str, output_dir: str, overrides: list[str]):
    """Three iterations, then a checkpoint: the losses, every weight and the checkpoint's train_state."""
    from adm_megatron.config import load_config
    from adm_megatron.train.checkpoint import save_training_checkpoint
    from adm_megatron.train.checkpoint_files import read_part_tensors
    from adm_megatron.train.trainer import Trainer

    config = load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={output_dir}", *COMMON, *overrides])
    trainer = Trainer(config)
    losses = [{k: v for k, v in trainer.train_iteration(i).items() if k.endswith("/loss")} for i in range(3)]
    path = save_training_checkpoint(trainer, 3)
    weights = {f"{p}.{n}": w.detach().clone() for p, net in trainer.trainable.items()
               for n, w in net.module.named_parameters()}
    import os

    state = read_part_tensors(os.path.join(path, "train_state"), os.path.join(output_dir, "state.pt"))
    return losses, weights, state


def test_offload_stays_exact_when_copies_land_late_and_freed_memory_is_reused(tmp_path, world_of_one, monkeypatch):
    """The CPU stand-in for offload's CUDA path (``LateCopies``): nothing reads a host buffer before its
    copy has landed, nothing keeps using storage a tensor has left, and no gradient reaches a released
    buffer -- the run, its weights and its checkpointed optimizer state are still those of the run
    without offload, bit for bit."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    ref_losses, ref_weights, ref_state = _checkpointed_run(pipeline_dir, str(tmp_path / "off"), [])
    late = LateCopies(monkeypatch)
    losses, weights, state = _checkpointed_run(pipeline_dir, str(tmp_path / "on"), OFFLOAD)
    assert late.written_while_released and not any(late.written_while_released)  # restores happened, clean
    assert losses == ref_losses
    for name, want in {**ref_weights, **ref_state}.items():
        assert torch.equal({**weights, **state}[name], want), name
