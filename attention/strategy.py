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

from longctx.attention.hsr import check_block, check_eps, hsr_attend, merge_certificates
from longctx.attention.kernels import PositionMask, attend
from longctx.attention.merge import all_gather_merge

PHASES = ("context", "query")


@dataclass
class Step:
    """What one forward pass does on this rank; shared by all layers."""

    phase: str
    masks: dict  # window -> PositionMask (ring context: window -> one mask per ring step)
    slots: Tensor | None = None  # cache slots of the tokens this rank keeps
    skip: int = 0  # leading new tokens this rank computes but does not keep (a recomputed anchor)


DECODE_MODES = ("dense", "hsr")


class AttentionStrategy:
    """Every strategy also chooses how phase 2 (query and decode) reads each rank's KV cache: `decode="dense"` reads
    all of it; `decode="hsr"` reads only the key blocks needed for the unread softmax mass to be certified below
    `hsr_eps` (attention/hsr.py), always reading the first `hsr_sink` and the latest `hsr_recent` tokens' blocks."""

    name: str = ""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        decode: str = "dense",
        hsr_eps: float = 1e-3,
        hsr_block: int = 64,
        hsr_sink: int = 64,
        hsr_recent: int = 256,
    ):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}; got {decode!r}")
        if decode == "hsr":
            check_eps(hsr_eps)
            check_block(hsr_block)
        self.decode, self.hsr_eps, self.hsr_block, self.hsr_sink, self.hsr_recent = decode, hsr_eps, hsr_block, hsr_sink, hsr_recent
        # over a phase 2, on the device (a CUDA graph's replays add to it): this rank's blocks read and visible
        # (summed over layers, KV heads and steps) and the largest composed certificate
        self.hsr_stats: Tensor | None = None
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

    @property
    def summary_block(self) -> int | None:
        """Block size of the key summaries the KV cache must keep for this strategy's decode (None: none)."""
        return self.hsr_block if self.decode == "hsr" else None

    def cache_slots(self, n_ctx: int, n_after: int) -> int:
        return self.kept_context(n_ctx) + (n_after if self.keeps_new_tokens else 0)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")
        self.phase = phase
        if phase == "context":
            self.hsr_stats = None

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
            if self.decode == "hsr":
                return self.sparse_attend(q, cache, step.masks[window])
            out, lse = attend(q, cache.k_cache, cache.v_cache, step.masks[window], return_lse=True)
            if self.world > 1:
                out, lse = all_gather_merge(out, lse, self.group)
            return out.to(q.dtype)
        return self.attend_context(q, k, v, cache, step, window)

    def sparse_attend(self, q: Tensor, cache, mask: PositionMask) -> Tensor:
        """HSR over this rank's cache; across ranks the partials merge as dense ones do and the certificates compose
        as the read-mass-weighted mean (attention/hsr.py), counted in `hsr_stats` (by the kernels on one rank)."""
        if self.hsr_stats is None:
            self.hsr_stats = torch.zeros(3, dtype=torch.float64, device=q.device)
        alone = self.world == 1
        r = hsr_attend(q, cache.k_cache, cache.v_cache, mask, cache.summary, self.hsr_eps, self.hsr_sink, self.hsr_recent,
                       self.hsr_stats if alone else None)  # fmt: skip
        if alone:
            return r.out.to(q.dtype)
        lses = [torch.empty_like(r.lse) for _ in range(self.world)]
        certs = [torch.empty_like(r.certificate) for _ in range(self.world)]
        dist.all_gather(lses, r.lse.contiguous(), group=self.group)
        dist.all_gather(certs, r.certificate.contiguous(), group=self.group)
        cert = merge_certificates(torch.stack(lses), torch.stack(certs))
        out, _ = all_gather_merge(r.out, r.lse, self.group)
        self.hsr_stats[0] += r.blocks_read.sum()
        self.hsr_stats[1] += r.blocks_visible * r.blocks_read.numel()
        torch.maximum(self.hsr_stats[2], cert.max(), out=self.hsr_stats[2])
        return out.to(q.dtype)

    def hsr_report(self) -> dict | None:
        """The share of key blocks phase 2 read (over all ranks) and its largest certificate; None before any."""
        if self.hsr_stats is None:
            return None
        stats = self.hsr_stats.clone()
        if self.world > 1:
            dist.all_reduce(stats[:2], group=self.group)
        read, visible, worst = stats.tolist()
        return {"hsr_blocks_read_share": read / max(visible, 1), "hsr_max_certificate": worst}

    # --- phase 1, what each strategy defines
    def begin_context(self, model, positions: Tensor, windows: set[int | None]) -> Step:
        raise NotImplementedError

    def attend_context(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        raise NotImplementedError


class GlobalAttention(AttentionStrategy):
    """Exact causal attention on one rank: new tokens are cached and attend to everything cached."""

    name = "global"

    def begin(self, model, positions: Tensor) -> Step:
        # (checked here, not when built: a memory plan builds strategies inside a run of any size, see `at`)
        if self.world > 1:
            raise ValueError(
                f"attention=global runs on one rank, but {self.world} ranks are running; "
                "use attention=ring (exact) or attention=star across ranks"
            )
        slots = model.reserve(positions) if model.has_cache else None
        kv_pos = model.kv_pos if model.has_cache else positions
        return Step(self.phase, {w: PositionMask(positions, kv_pos, w) for w in set(model.args.layer_windows)}, slots)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        if step.slots is not None:
            k, v = cache.update(step.slots, k, v)
        if self.phase == "query" and self.decode == "hsr":
            return self.sparse_attend(q, cache, step.masks[window])
        return attend(q, k, v, step.masks[window])
