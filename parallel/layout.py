"""Where a rank sits when `parallel.nproc = hosts × parallel.tp`.

Ranks are numbered host by host, so that the `tp` ranks of one host (one machine under torchrun) are neighbours:

    rank = host · tp + tp_rank            e.g. 2 hosts × tp=2:   host 0: ranks 0 1    host 1: ranks 2 3

Two families of groups come out of one 2-D DeviceMesh of shape (hosts, tp):

* the **tp group** of a host (ranks 0 1, and 2 3): the all-reduces of tensor parallelism (parallel/tensor.py);
* the **context-parallel group** of a tp rank, one rank of every host (ranks 0 2, and 1 3): star's anchor
  broadcast, ring's passes and the phase-2 merge. Ranks holding the same heads talk only to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.models.config import ModelArgs
from longctx.parallel.tensor import TensorParallel


@dataclass(frozen=True)
class Layout:
    hosts: int
    tp: int
    host: int = 0
    tp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None  # None: the default group (all ranks, when tp == 1)
    tp_group: dist.ProcessGroup | None = None

    @property
    def world(self) -> int:
        return self.hosts * self.tp

    def tensor_parallel(self, args: ModelArgs) -> TensorParallel | None:
        """How this rank slices a model of `args` (None without tensor parallelism)."""
        return TensorParallel(args, self.tp, self.tp_rank, self.tp_group) if self.tp > 1 else None

    def describe(self) -> str:
        if self.tp == 1:
            return f"{self.hosts} rank{'s' * (self.hosts > 1)}"
        return f"{self.hosts} host{'s' * (self.hosts > 1)} × tp={self.tp}"


def make_layout(tp: int, device: torch.device) -> Layout:
    """This process's place in the process group already joined (or a single rank), with `tp` ranks per host."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tp={tp} must divide the {world} ranks (parallel.nproc = hosts × parallel.tp)")
    if tp == 1:
        return Layout(hosts=world, tp=1, host=dist.get_rank() if world > 1 else 0)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("cp", "tp"))
    rank = dist.get_rank()
    return Layout(world // tp, tp, rank // tp, rank % tp, mesh.get_group("cp"), mesh.get_group("tp"))
