"""Bytes of tensor storage alive at once, tracked op by op: the CPU stand-in for CUDA's max_memory_allocated."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Within the mode, every storage an op returns is counted until it is freed; `peak` is the most at once.

    Storages made before the mode are not counted; kernels' internal scratch is not seen (it is not a tensor the
    op returns)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= n
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self.live and not self.ignores(key):
                    self.live[key] = (StorageWeakRef(storage), n)
                    self.current += n
        self.peak = max(self.peak, self.current)
        return out

    def ignores(self, data_ptr: int) -> bool:
        """Whether a storage at this address is not the process's own memory (a subclass says which)."""
        return False
