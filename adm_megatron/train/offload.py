"""Offload of idle networks: what a phase does not update waits in host memory.

``optim.<network>.offload`` chooses, per trainable network:
- ``optimizer``: the network's optimizer state (Adam's moments, and fp32 main params when they are
  copies) moves to host memory at the start of every phase that does not update the network and
  comes back at the start of the next phase that does;
  Its gradient buffer (megatron DDP's ``main_grad`` storage) is released meanwhile with megatron's
  own ``offload_grad_buffers`` and reallocated, zeroed, by ``restore_grad_buffers``: gradients are
  made and consumed within the network's own phase, so nothing is copied;
- ``optimizer_and_params``: also the network's weights, in the phases that do not run it at all.
  Which phases run which network is the algorithm's business, so it is learned rather than listed:
  a network's weights are offloaded at the start of a phase in which they were not used the
  previous time that phase ran, and a forward pre-hook brings them back (synchronously) if the
  network is called after all. The first iteration therefore offloads no weights. Weights that are
  views into megatron DDP's parameter buffer (a network with ``shard_over_dp``) cannot move one by
  one; the config refuses that combination.

A parameter keeps its device and its storage object while its value waits in the host buffer kept
for it (allocated at the first move, pinned when CUDA is present): its storage is released
(``resize_(0)``, as megatron's own ``offload_to_cpu`` releases its buffers) and reserved again before
the value is copied back. It must not be given another device's tensor as its ``.data``: autograd then
drops the parameter's gradient accumulator, the node megatron DDP hooked to put gradients into
``main_grad``, and on a GPU every later gradient of the weights offloaded went to ``param.grad``
instead -- steps of zero gradient, training that silently parted from the run without offload (the
CPU, where the host is the same device, never showed it). An optimizer state (Adam's moments, fp32
main params: no autograd node) swaps its ``.data`` with its host buffer, so that a checkpoint reads it
where it is. With CUDA, device-to-host copies run non-blocking on a side stream (the compute stream
goes on with the phase while they drain; the device memory is reused only once they are done) and
host-to-device copies on the same stream, which the compute stream waits for before the phase's
first kernel. Without CUDA the copies are real but synchronous, and where a tensor lives (its storage
released, or the host buffer's) is what the tests check; iterations are bit-identical with offload on
and off.

Before a checkpoint is written and at the end of a run, ``restore_weights`` brings the weights
back; optimizer states are checkpointed from wherever they are, after ``settle`` (the CPU reads the
host buffers, so their copies must have landed, not only be ordered before the device's next use).
"""

from __future__ import annotations

import contextlib

import torch


class HostMover:
    """Moves tensors between the compute device and their host buffers (see the module docstring:
    parameters keep their device and storage object, other tensors swap their ``.data``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: dict[int, torch.Tensor] = {}  # id(tensor) -> its host buffer

    def _stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def is_on_host(self, tensor: torch.Tensor) -> bool:
        host = self.host.get(id(tensor))
        if host is None:
            return False
        if isinstance(tensor, torch.nn.Parameter):
            return tensor.untyped_storage().nbytes() == 0
        return tensor.data_ptr() == host.data_ptr()

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        host = self.host.get(id(t))
        if host is None:
            if isinstance(t, torch.nn.Parameter) and not (
                    t.is_contiguous() and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
                raise ValueError(f"offload: a parameter of shape {tuple(t.shape)} shares its storage with other "
                                 "tensors; its memory cannot be released alone")
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
            self.host[id(t)] = host
        return host

    @torch.no_grad()
    def to_host(self, tensors: list[torch.Tensor]) -> None:
        tensors = [t for t in tensors if t.numel() and not self.is_on_host(t)]
        if not tensors:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the values are final
        with self._stream():
            for t in tensors:
                host = self._host_buffer(t)
                host.copy_(t.data, non_blocking=self.cuda)
                if self.cuda:
                    t.data.record_stream(self.stream)  # its memory is reused only once the copy is done
                if isinstance(t, torch.nn.Parameter):
                    t.untyped_storage().resize_(0)  # released in place: the same tensor, device and storage
                else:
                    t.data = host

    @torch.no_grad()
    def to_device(self, tensors: list[torch.Tensor]) -> None:
        tensors = [t for t in tensors if self.is_on_host(t)]
        if not tensors:
            return
        # the device memory is taken on the compute stream, which uses it, before the side stream
        # waits for it: with torch's deterministic algorithms ``empty`` / ``resize_`` queue a NaN fill
        # there that must land first
        targets = []
        for t in tensors:
            if isinstance(t, torch.nn.Parameter):
                t.untyped_storage().resize_(t.numel() * t.element_size())
                targets.append(t.data)
            else:
                targets.append(torch.empty(t.shape, dtype=t.dtype, device=self.device))
        if self.cuda:  # the side stream's copies come after what the compute stream has queued
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._stream():
            for t, on_device in zip(tensors, targets):
                on_device.copy_(self.host[id(t)], non_blocking=self.cuda)
        for t, on_device in zip(tensors, targets):
            if not isinstance(t, torch.nn.Parameter):
                t.data = on_device
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def settle(self) -> None:
        """Block the CPU until every queued copy has landed. The compute stream waits for the side
        stream on the device, the CPU does not: a host buffer just queued for a device-to-host copy
        may still be filling while the CPU reads it."""
        if self.cuda:
            self.stream.synchronize()


class Offloader:
    """Per-phase placement of the trainable networks' optimizer state (and weights); see the module
    docstring. ``networks``: name -> ``TrainableNetwork``; ``modes``: name -> offload setting."""

    def __init__(self, networks: dict, modes: dict[str, str], device: torch.device):
        self.networks = networks
        self.modes = {name: mode for name, mode in modes.items() if name in networks and mode != "none"}
        self.mover = HostMover(torch.device(device))
        self.phase: str | None = None
        self.used: dict[str, set[str]] = {}  # phase -> networks whose weights it ran (last time it ran)
        for name, mode in self.modes.items():
            if mode == "optimizer_and_params":
                networks[name].module.register_forward_pre_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(module, args):
            if self.phase is not None:
                self.used.setdefault(self.phase, set()).add(name)
            self.mover.to_device(self._params(name))
        return hook

    def _params(self, name: str) -> list[torch.Tensor]:
        return list(self.networks[name].module.parameters())

    def _state(self, name: str) -> list[torch.Tensor]:
        return self.networks[name].optimizer.state_tensors()

    def before_phase(self, phase: str, trained: tuple[str, ...]) -> None:
        """Place every offloaded network's state and weights for ``phase`` (which updates
        ``trained``)."""
        ran_last_time = self.used.get(phase)
        self.phase = phase
        self.used[phase] = set()
        for name, mode in self.modes.items():
            module = self.networks[name].module
            if name in trained:
                if self._grads_released(name):
                    module.restore_grad_buffers(synchronize=False)
                self.mover.to_device(self._params(name) + self._state(name))
                continue
            self.mover.to_host(self._state(name))
            if not self._grads_released(name):
                module.offload_grad_buffers(synchronize=self.mover.cuda, empty_cache=False)
            if mode != "optimizer_and_params" or ran_last_time is None:
                continue
            if name in ran_last_time:  # runs again in this phase: bring its weights back now
                self.mover.to_device(self._params(name))
            else:
                self.mover.to_host(self._params(name))

    def restore_weights(self) -> None:
        """Every offloaded network's weights back on the compute device (before a checkpoint is
        written, before the generator is exported); optimizer states stay where they are: they
        are checkpointed from host memory as well."""
        for name in self.modes:
            self.mover.to_device(self._params(name))

    def settle(self) -> None:
        """Every copy to and from host memory has landed once this returns, so the host buffers may
        be read on the CPU: a checkpoint writes the optimizer states from there (with CUDA, those
        offloaded at the start of the iteration's last phase may still be on their way)."""
        self.mover.settle()

    def _grads_released(self, name: str) -> bool:
        buffers = self.networks[name].module.buffers
        return any(b.grad_data.untyped_storage().size() == 0 for b in buffers)

    def where(self, name: str) -> dict[str, str]:
        """Where network ``name``'s optimizer state and weights live now: 'host', 'device' or
        'mixed', and whether its gradient buffer is 'released' (read from the tensors' storage, not
        from a flag)."""
        def place(tensors):
            on_host = {self.mover.is_on_host(t) for t in tensors}
            return "mixed" if len(on_host) > 1 else ("host" if on_host == {True} else "device")
        return {"optimizer": place(self._state(name)), "params": place(self._params(name)),
                "grads": "released" if self._grads_released(name) else "device"}
