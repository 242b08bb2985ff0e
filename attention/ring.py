"""Ring attention: exact attention with the context sharded over ranks and KV shards passed around a ring.

Layout: zig-zag. The context is cut into 2N chunks; rank r holds chunks r and 2N-1-r. Under a causal mask a
token's work grows with its position, so contiguous shards would leave rank 0 almost idle and rank N-1 with most
of the work; pairing an early chunk with a late one gives every rank the same amount of visible work.

In each of N steps a rank attends its queries to the KV shard it holds, while sending that shard to the next rank
and receiving the previous rank's (point-to-point, overlapped with the compute); partials are merged with the
(output, lse) merge. Masks are by position, so every step's mask is known up front and built once per forward.
Phase 2 is the shared sharded query phase of `AttentionStrategy`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention.cache import KVCache, LayerKV
from longctx.attention.decode import DecodeMethod
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from longctx.attention.merge import MERGE_CHUNK_ELEMENTS, merge_into
from longctx.attention.quant import pack, packed_width, unpack
from longctx.attention.strategy import AttentionStrategy, Phase1Memory, Step


def _bounds(n_ctx: int, world: int) -> list[int]:
    """Where the 2N near-equal chunks of the context start (and the last one ends)."""
    return [i * n_ctx // (2 * world) for i in range(2 * world + 1)]


def zigzag_shards(n_ctx: int, world: int) -> list[Tensor]:
    """Context indices held by each rank: chunks r and 2N-1-r of 2N near-equal chunks."""
    bounds = _bounds(n_ctx, world)
    chunk = lambda i: torch.arange(bounds[i], bounds[i + 1])  # noqa: E731
    return [torch.cat([chunk(r), chunk(2 * world - 1 - r)]) for r in range(world)]


def shard_length(n_ctx: int, world: int, rank: int) -> int:
    """`len(zigzag_shards(n_ctx, world)[rank])`, counted."""
    b = _bounds(n_ctx, world)
    return b[rank + 1] - b[rank] + b[2 * world - rank] - b[2 * world - 1 - rank]


class RingAttention(AttentionStrategy):
    name = "ring"

    def __init__(self, group: dist.ProcessGroup | None = None, decode: DecodeMethod | None = None):
        super().__init__(group, decode)
        self.layout: list[Tensor] | None = None

    def fed_tokens(self, n_ctx: int) -> int:
        return shard_length(n_ctx, self.world, self.rank)

    def context_indices(self, n_ctx: int) -> Tensor:
        if n_ctx < 2 * self.world:
            raise ValueError(
                f"ring on {self.world} ranks needs a context of at least {2 * self.world} tokens; got {n_ctx}"
            )
        self.layout = zigzag_shards(n_ctx, self.world)
        return self.layout[self.rank]

    def phase1_memory(
        self, n_ctx: int, tokens: int, heads: int, kv_heads: int, head_dim: int, itemsize: int
    ) -> Phase1Memory:
        """The shard held and the one arriving (the last step receives nothing), as stored (in one byte: its bytes and
        scales, read back at full width per step) and the fp32 (output, lse) merged so far; merging a step's partial
        stacks both in fp32 and weighs them, a chunk of `merge_into`'s rows at a time."""
        if self.world == 1:
            return Phase1Memory(one_piece=tokens >= self.fed_tokens(n_ctx))
        keys = max(shard_length(n_ctx, self.world, r) for r in range(self.world))
        width, wire = packed_width(head_dim, self.kv_dtype or torch.float32)
        shard = keys * kv_heads * width * (1 if wire == torch.uint8 else itemsize)
        read = 2 * keys * kv_heads * head_dim * itemsize if wire == torch.uint8 else 0
        running = tokens * heads * (head_dim + 1) * 4
        held = shard + read + (max(shard, running) if self.world == 2 else shard + running)
        merging = 6 * min(tokens * heads * head_dim, MERGE_CHUNK_ELEMENTS) * 4 + tokens * heads * head_dim * itemsize
        return Phase1Memory(keys=keys, buffers=held, merging=merging)

    def context_passes(self, n_ctx: int) -> list[Tensor | None]:
        """On one rank, chunks as global's; over several, each rank's shard in one pass: a zig-zag shard's late
        chunk needs keys of every rank's shard that a chunked pass would not have made yet."""
        if self.world == 1:
            return super().context_passes(n_ctx)
        if self.chunk is not None and self.chunk < self.fed_tokens(n_ctx):
            raise ValueError(
                f"attention=ring over {self.world} ranks feeds each rank's shard in one pass, but ctx.chunk="
                f"{self.chunk} is shorter than its {self.fed_tokens(n_ctx)} tokens; leave ctx.chunk unset, or use "
                "attention=star, which feeds its blocks in chunks"
            )
        return [self.context_indices(n_ctx)]

    def pass_tokens(self, n_ctx: int) -> int:
        return super().pass_tokens(n_ctx) if self.world == 1 else self.fed_tokens(n_ctx)

    def begin_context(self, cache: KVCache | None, positions: Tensor, windows: set[int | None]) -> Step:
        if self.world == 1:  # global's: what the cache holds so far
            slots = cache.reserve(positions) if cache is not None else None
            kv_pos = cache.positions if cache is not None else positions
            return Step("context", {w: [PositionMask(positions, kv_pos, w)] for w in windows}, slots)
        if self.layout is None:
            raise ValueError("ring phase 1 needs the context layout: call context_indices(n_ctx) first")
        self._starts_empty(cache, "ring")
        slots = cache.reserve(positions) if cache is not None else None
        # step s holds the shard that started on rank (rank - s) mod N
        shards = [self.layout[(self.rank - s) % self.world].to(positions.device) for s in range(self.world)]
        masks = {w: [PositionMask(positions, kv, w) for kv in shards] for w in windows}
        return Step("context", masks, slots)

    def attend_context(
        self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None, step: Step, window: int | None
    ) -> Tensor:
        if kv is not None:
            kv.write(step.slots, k, v)
        if self.world == 1:
            mask = step.masks[window][0]
            return attend(q, kv.k, kv.v, mask, scales=kv.scales) if kv is not None else attend(q, k, v, mask)
        # the shard as the cache stores it (one byte with its scales: half the bytes on the wire), read in q's dtype
        D = k.shape[-1]
        held = kv.packed(step.slots) if kv is not None else pack(k, v)
        stored = kv.k.dtype if kv is not None else k.dtype
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        if self.group is not None:
            nxt, prev = dist.get_global_rank(self.group, nxt), dist.get_global_rank(self.group, prev)
        out = lse = None
        masks = step.masks[window]
        for s, mask in enumerate(masks):
            if s + 1 < self.world:  # start passing the shard on before computing with it
                incoming = held.new_empty(*held.shape[:2], masks[s + 1].kv_pos.numel(), held.shape[-1])
                # one batch, so NCCL pairs each rank's send with its neighbour's receive instead of deadlocking
                reqs = dist.batch_isend_irecv(
                    [dist.P2POp(dist.isend, held, nxt, self.group), dist.P2POp(dist.irecv, incoming, prev, self.group)]
                )
            o, l = attend(q, *unpack(held, D, q.dtype, stored), mask, return_lse=True)
            if out is None:
                out, lse = o.float(), l.float()
            else:
                merge_into(out, lse, o, l)
            if s + 1 < self.world:
                for r in reqs:
                    r.wait()
                held = incoming
        return out.to(q.dtype)
