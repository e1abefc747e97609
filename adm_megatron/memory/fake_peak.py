"""The peak tensor memory of a computation at any size, without its data or its time: run it on
fake tensors (torch's ``FakeTensorMode``: shapes, dtypes and storages, no values) under
:class:`FakePeak`, a dispatch mode that adds each storage's bytes when an op creates it (not views
or in-place results) and takes them off when the storage is collected (a weakref callback), forward
and backward alike. Tensors made before the mode (weights, inputs) are not counted: the figure is
what the computation adds.
Counted storages are the allocator's requests, not its rounding. torch's own
``torch.distributed._tools.mem_tracker.MemTracker`` does the same bookkeeping but registers gradient
hooks on every parameter, so it cannot follow frozen modules, which is what this is for (ADP's VAE
and vision encoder, ``memory/pixel_branch.py``).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FakePeak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0  # bytes of the counted storages alive now
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        nbytes = storage.nbytes()

        def collected(_, key=key, nbytes=nbytes):
            if self._alive.pop(key, None) is not None:
                self.current -= nbytes

        self._alive[key] = weakref.ref(storage, collected)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            # a view or an in-place result allocates nothing (its storage may be an uncounted weight's)
            if isinstance(leaf, torch.Tensor) and not leaf._is_view() and leaf.untyped_storage()._cdata not in inputs:
                self._count(leaf)
        return out
