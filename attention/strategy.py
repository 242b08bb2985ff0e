"""What a strategy is, and `global`, the exact single-rank reference.

A strategy decides, for each forward pass on its rank, which of the new tokens the KV cache keeps and what the
queries attend to. The model calls `begin` once per forward pass (masks are built there, once for all layers) and
`attend` in every layer. Long prompts run in two phases, driven by `models.generate`:

* phase 1, "context": each rank feeds the context tokens `context_indices` names (its shard) and keeps their KV;
* phase 2, "query": the query and generated tokens go to every rank; each attends to its local KV and the
  partials are merged; the new tokens' KV is kept on the last rank.

On one rank with `global` both phases are plain causal attention over the cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from attention.kernels import PositionMask, attend
from attention.merge import all_gather_merge

PHASES = ("context", "query")


@dataclass
class Step:
    """What one forward pass does on this rank; shared by all layers."""

    phase: str
    masks: dict  # window -> PositionMask (ring context: window -> one mask per ring step)
    slots: Tensor | None = None  # cache slots of the tokens this rank keeps
    skip: int = 0  # leading new tokens this rank computes but does not keep (a recomputed anchor)


class AttentionStrategy:
    name: str = ""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.world = dist.get_world_size(group) if distributed else 1
        self.phase = "context"

    def at(self, rank: int, world: int) -> "AttentionStrategy":
        """A copy of this strategy as rank `rank` of `world` holds it: to plan a run without starting its ranks."""
        placed = copy.copy(self)
        placed.rank, placed.world = rank, world
        return placed

    # --- the layout of the context over ranks
    def context_indices(self, n_ctx: int) -> Tensor:
        """Indices (= positions) of the context tokens this rank feeds in phase 1."""
        return torch.arange(n_ctx)

    def kept_context(self, n_ctx: int) -> int:
        """How many context tokens this rank's KV cache keeps."""
        return len(self.context_indices(n_ctx))

    @property
    def keeps_new_tokens(self) -> bool:
        """Whether this rank keeps the KV of query and generated tokens."""
        return self.rank == self.world - 1

    def cache_slots(self, n_ctx: int, n_after: int) -> int:
        return self.kept_context(n_ctx) + (n_after if self.keeps_new_tokens else 0)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")
        self.phase = phase

    # --- per forward pass
    def begin(self, model, positions: Tensor) -> Step:
        windows = set(model.args.layer_windows)
        if self.phase == "query":
            if not model.has_cache:
                raise ValueError("phase 2 (query) attends to the KV cache: call model.setup_cache first")
            slots = model.reserve(positions) if self.keeps_new_tokens else None
            return Step("query", {w: PositionMask(positions, model.kv_pos, w) for w in windows}, slots)
        return self.begin_context(model, positions, windows)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        if step.phase == "query":
            if step.slots is not None:
                cache.update(step.slots, k, v)
            out, lse = attend(q, cache.k_cache, cache.v_cache, step.masks[window], return_lse=True)
            if self.world > 1:
                out, lse = all_gather_merge(out, lse, self.group)
            return out.to(q.dtype)
        return self.attend_context(q, k, v, cache, step, window)

    # --- phase 1, what each strategy defines
    def begin_context(self, model, positions: Tensor, windows: set[int | None]) -> Step:
        raise NotImplementedError

    def attend_context(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        raise NotImplementedError


class GlobalAttention(AttentionStrategy):
    """Exact causal attention on one rank: new tokens are cached and attend to everything cached."""

    name = "global"

    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__(group)
        if self.world > 1:
            raise ValueError(
                f"attention=global runs on one rank, but {self.world} ranks are running; "
                "use attention=ring (exact) or attention=star across ranks"
            )

    def begin(self, model, positions: Tensor) -> Step:
        slots = model.reserve(positions) if model.has_cache else None
        kv_pos = model.kv_pos if model.has_cache else positions
        return Step(self.phase, {w: PositionMask(positions, kv_pos, w) for w in set(model.args.layer_windows)}, slots)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        if step.slots is not None:
            k, v = cache.update(step.slots, k, v)
        return attend(q, k, v, step.masks[window])
