"""Star attention (Acharya et al., NVIDIA 2024): block-local context encoding with an anchor, exact phase 2.

Phase 1 cuts the context into blocks of `block_size` tokens (the last may be shorter), assigned contiguously to
ranks. Each block attends causally to itself and to the anchor, the first `anchor_size` tokens, which keep their
own positions. Each rank keeps only its own blocks' KV. The anchor reaches the other ranks in one of two ways:

* `recompute` (the paper): each rank encodes the anchor again as a prefix of its tokens, and drops its KV;
* `broadcast`: the rank holding the first block sends the anchor's K/V of each layer to the others. Exact, because
  the anchor attends only to itself; the other ranks skip the anchor's compute.

Phase 2 is the shared sharded query phase of `AttentionStrategy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention.cache import KVCache, LayerKV
from longctx.attention.decode import DecodeMethod
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from longctx.attention.merge import MERGE_CHUNK_ELEMENTS, merge_into
from longctx.attention.quant import pack, packed_width, unpack
from longctx.attention.strategy import AttentionStrategy, Phase1Memory, Step, attended_pairs
from longctx.conf.schema import check_fields, option

ANCHOR_MODES = ("broadcast", "recompute")


def star_block_size(n_ctx: int, world: int, min_block: int) -> int:
    """Star's default block: a quarter of the context (context / ranks beyond 4 ranks), but not below `min_block`
    tokens, so that a short context runs as fewer, longer blocks (one exact block on one rank), as long as every
    rank still gets a block. ACCURACY.md has the measurements behind the floor; attention/README.md the trade-off."""
    quarter = -(-n_ctx // max(4, world))
    return max(1, quarter, min(min_block, -(-n_ctx // world)))


@dataclass
class StarParams:
    block_size: int | None = option(
        None,
        "tokens per block; null: a quarter of the context (context / ranks beyond 4 ranks), at least attention.min_block_size",
        low=1,
    )
    anchor_size: int | None = option(None, "the anchor's tokens, the first of the context; null: block_size", low=1)
    anchor_mode: str = option("broadcast", "broadcast (exact, cheaper) or recompute (the paper)", choices=ANCHOR_MODES)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.block_size is not None and self.anchor_size is not None and self.anchor_size > self.block_size:
            raise ValueError(
                f"attention.params.anchor_size={self.anchor_size} is larger than block_size={self.block_size}; use "
                "at most the block"
            )


@dataclass
class StarRule:
    min_block_size: int = option(
        4096,
        "the default blocks' floor: a context of up to this many tokens runs as one exact block on one rank",
        low=0,
    )


class StarAttention(AttentionStrategy):
    name = "star"
    Params = StarParams
    NodeOptions = StarRule

    def __init__(
        self,
        block_size: int,
        anchor_size: int | None = None,
        anchor_mode: str = "broadcast",
        group: dist.ProcessGroup | None = None,
        decode: DecodeMethod | None = None,
    ):
        super().__init__(group, decode)
        if block_size is None:
            raise ValueError("star needs a block_size (a config's null is the default rule: `resolve_params`)")
        p = StarParams(block_size, block_size if anchor_size is None else anchor_size, anchor_mode)
        self.block_size, self.anchor_size, self.anchor_mode = p.block_size, p.anchor_size, p.anchor_mode

    @classmethod
    def resolve_params(cls, node: Mapping, n_ctx: int, world: int) -> dict:
        """Star's blocks where the config leaves block_size null follow the default rule (`star_block_size`)."""
        params = dict(node.get("params") or {})
        if params.get("block_size") is None:
            params["block_size"] = star_block_size(n_ctx, world, node.get("min_block_size") or 0)
        return params

    @classmethod
    def check(cls, node: Mapping, n_ctx: int, what: str, nproc: int, tp: int) -> None:
        block = (node.get("params") or {}).get("block_size")
        hosts = nproc // tp
        if block is not None and -(-n_ctx // block) < hosts:
            where = f"parallel.nproc={nproc}" + (f" / parallel.tp={tp} = {hosts} hosts" if tp > 1 else "")
            raise ValueError(
                f"attention.params.block_size={block} cuts {what}={n_ctx} into {-(-n_ctx // block)} blocks, "
                f"fewer than {where}; use a smaller block_size or fewer ranks"
            )

    def own_range(self, n_ctx: int) -> tuple[int, int]:
        """[start, end) of the context tokens in this rank's blocks."""
        n_blocks = -(-n_ctx // self.block_size)
        if self.world > n_blocks:
            raise ValueError(
                f"{self.world} ranks but the context of {n_ctx} tokens has only {n_blocks} blocks of "
                f"{self.block_size}; use a smaller star block_size or fewer ranks"
            )
        first, last = self.rank * n_blocks // self.world, (self.rank + 1) * n_blocks // self.world
        return first * self.block_size, min(last * self.block_size, n_ctx)

    @property
    def recomputes_anchor(self) -> bool:
        """Ranks after the first feed the anchor in front of their blocks (rank 0's first block is the anchor)."""
        return self.rank > 0 and self.anchor_mode == "recompute"

    @property
    def receives_anchor(self) -> bool:
        """In broadcast mode the ranks after the first get the anchor's K/V from rank 0 in every layer."""
        return self.anchor_mode == "broadcast" and self.world > 1 and self.rank > 0

    def context_indices(self, n_ctx: int) -> Tensor:
        start, end = self.own_range(n_ctx)
        own = torch.arange(start, end)
        return torch.cat([torch.arange(self.anchor_size), own]) if self.recomputes_anchor else own

    def fed_tokens(self, n_ctx: int) -> int:
        start, end = self.own_range(n_ctx)
        return end - start + (self.anchor_size if self.recomputes_anchor else 0)

    def kept_context(self, n_ctx: int) -> int:
        start, end = self.own_range(n_ctx)
        return end - start

    def phase1_tokens(self, n_ctx: int) -> int:
        """The context, and the anchor again on every rank that recomputes it."""
        return n_ctx + self._recomputing(n_ctx) * min(self.anchor_size, n_ctx)

    def attended_pairs(self, n_ctx: int, window: int | None) -> int:
        """Each block's triangle and, past the first, block × anchor; the anchor's triangle again on every rank
        that recomputes it."""
        anchor = min(self.anchor_size, n_ctx)
        return attended_pairs(n_ctx, window, self.block_size, anchor) + self._recomputing(n_ctx) * attended_pairs(
            anchor, window
        )

    def _recomputing(self, n_ctx: int) -> int:
        """Ranks that encode the anchor again."""
        return min(self.world, -(-n_ctx // self.block_size)) - 1 if self.anchor_mode == "recompute" else 0

    def phase1_memory(
        self, n_ctx: int, tokens: int, heads: int, kv_heads: int, head_dim: int, itemsize: int
    ) -> Phase1Memory:
        """A pass attends to the cache; where the anchor is not in it (received in broadcast mode), the anchor as
        received and read back, and the fp32 output it is merged into. A query sees its block and the anchor (where
        the anchor is received, the attention over the cache sees the block alone)."""
        if not self.receives_anchor:
            return Phase1Memory(keys_seen=self.anchor_size + self.block_size)
        seen = self.block_size
        anchor = min(self.anchor_size, n_ctx) * kv_heads
        width, wire = packed_width(head_dim, self.kv_dtype or torch.float32)
        received = anchor * width * (wire.itemsize if wire == torch.uint8 else itemsize)
        read = 2 * anchor * head_dim * itemsize if wire == torch.uint8 else 0
        # after the attention over the cache: its output in fp32 and the merge's temporaries
        merging = tokens * heads * (head_dim + 1) * 4 + 6 * min(tokens * heads * head_dim, MERGE_CHUNK_ELEMENTS) * 4
        return Phase1Memory(buffers=received + read, merging=merging, keys_seen=seen)

    def describe(self, n_ctx: int, where: str) -> str:
        n_blocks = -(-n_ctx // self.block_size)
        return (
            f"star: context of {n_ctx} tokens in {n_blocks} block{'s' * (n_blocks > 1)} of {self.block_size} over "
            f"{where}, anchor {min(self.anchor_size, n_ctx)} tokens ({self.anchor_mode})"
        )

    def record(self) -> dict:
        return {"block_size": self.block_size, "anchor_size": self.anchor_size, "anchor_mode": self.anchor_mode}

    def context_passes(self, n_ctx: int) -> list[Tensor | None]:
        """Chunks of this rank's tokens that never cut across a block (`_chunks`), as many passes on every rank: in
        broadcast mode the first rank sends the anchor in every pass, so its first pass holds the whole anchor.
        Recomputing ranks feed the anchor in front of their tokens and keep none of it, so they take one pass."""
        if self.recomputes_anchor and self.pass_tokens(n_ctx) < self.fed_tokens(n_ctx):
            raise ValueError(
                "star with attention.params.anchor_mode=recompute feeds each rank's blocks in one pass; use "
                "anchor_mode=broadcast to feed them in chunks (ctx.chunk)"
            )
        mine = self._chunks(n_ctx)
        if self.world == 1 or self.anchor_mode == "recompute":
            return mine
        passes = max(len(self.at(r, self.world)._chunks(n_ctx)) for r in range(self.world))
        return mine + [None] * (passes - len(mine))

    def _chunks(self, n_ctx: int) -> list[Tensor]:
        """Each block in equal parts of at most the pass's tokens, and whole blocks that fit together in one pass: a
        pass's queries then see the anchor and their own block as a few long pieces of one shape, where a chunk across
        a block's end would add short pieces and merges (attention.fused.split)."""
        idx, size = self.context_indices(n_ctx), self.pass_tokens(n_ctx)
        blocks = torch.unique_consecutive(idx // self.block_size, return_counts=True)[1].tolist()
        sends_anchor = self.rank == 0 and self.world > 1 and self.anchor_mode == "broadcast"
        parts: list[int] = []
        for i, block in enumerate(blocks):
            head = min(self.anchor_size, block) if sends_anchor and i == 0 else 0
            even = _equal_parts(block, size)
            parts += [head, *_equal_parts(block - head, size)] if head > even[0] else even  # the anchor whole first
        passes: list[int] = []
        for part in parts:
            if passes and passes[-1] + part <= size:
                passes[-1] += part
            else:
                passes.append(part)
        ends = torch.tensor(passes).cumsum(0).tolist()
        return [idx[end - n : end] for n, end in zip(passes, ends)]

    def pass_tokens(self, n_ctx: int) -> int:
        """The chunk; on the first rank in broadcast mode at least the anchor (its first pass sends it whole)."""
        size = super().pass_tokens(n_ctx)
        if self.rank == 0 and self.world > 1 and self.anchor_mode == "broadcast":
            return max(size, min(self.anchor_size, self.fed_tokens(n_ctx)))
        return size

    def idle_pass(self, cache: KVCache) -> None:
        """The anchor of every layer, sent by the first rank from its cache and taken by the others, as in a pass."""
        if self.anchor_mode == "broadcast" and self.world > 1:
            for kv in cache.layers:
                self._share_anchor(kv)

    def begin_context(self, cache: KVCache | None, positions: Tensor, windows: set[int | None]) -> Step:
        skip = int((positions < self.anchor_size).sum()) if self.recomputes_anchor else 0
        anchor = torch.arange(self.anchor_size, device=positions.device)
        if cache is None:  # the pass's own tokens, and the anchor's received K/V in front of them
            kv_pos = torch.cat([anchor, positions]) if self.receives_anchor else positions
            masks = {w: (PositionMask(positions, kv_pos, w, self.block_size, self.anchor_size), None) for w in windows}
            return Step("context", masks, None, skip)
        # what the cache holds so far, and the anchor where it is not in this rank's cache (received or recomputed)
        slots = cache.reserve(positions[skip:])
        outside = self.receives_anchor or skip > 0
        masks = {
            w: (
                PositionMask(positions, cache.positions, w, self.block_size, self.anchor_size),
                PositionMask(positions, anchor, w, self.block_size, self.anchor_size) if outside else None,
            )
            for w in windows
        }
        return Step("context", masks, slots, skip)

    def attend_context(
        self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None, step: Step, window: int | None
    ) -> Tensor:
        held, outside = step.masks[window]
        broadcast = self.anchor_mode == "broadcast" and self.world > 1
        if kv is None:
            if broadcast:
                k, v = self._share_anchor_of(k, v)
            return attend(q, k, v, held)
        kv.write(step.slots, k[:, :, step.skip :], v[:, :, step.skip :])
        received = self._share_anchor(kv) if broadcast else None
        if outside is None:
            return attend(q, kv.k, kv.v, held, scales=kv.scales)
        if received is not None:
            anchor = unpack(received, k.shape[-1], q.dtype, kv.k.dtype)
        else:  # recomputed here: as the cache would give it back
            anchor = kv.stored(k[:, :, : step.skip], v[:, :, : step.skip])
        out, lse = attend(q, kv.k, kv.v, held, return_lse=True, scales=kv.scales)
        out = out.float()
        merge_into(out, lse.float(), *attend(q, *anchor, outside, return_lse=True))
        return out.to(q.dtype)

    def _source(self) -> int:
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def _share_anchor(self, kv: LayerKV) -> Tensor | None:
        """The first rank sends the anchor's K/V of this layer as its cache stores them (one byte with its scales:
        half the bytes); the others receive it, packed (`attention.quant.unpack`)."""
        B, H, _, D = kv.k.shape
        if not self.receives_anchor:
            dist.broadcast(kv.packed(slice(0, self.anchor_size)), self._source(), self.group)
            return None
        width, wire = packed_width(D, kv.k.dtype)
        anchor = torch.empty(B, H, self.anchor_size, width, dtype=wire, device=kv.k.device)
        dist.broadcast(anchor, self._source(), self.group)
        return anchor

    def _share_anchor_of(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Without a KV cache: rank 0 sends the anchor's K/V of this pass; the others put it in front of their own."""
        B, H, _, D = k.shape
        if not self.receives_anchor:
            dist.broadcast(pack(k[:, :, : self.anchor_size], v[:, :, : self.anchor_size]), self._source(), self.group)
            return k, v
        anchor = torch.empty(B, H, self.anchor_size, 2 * D, dtype=k.dtype, device=k.device)
        dist.broadcast(anchor, self._source(), self.group)
        return torch.cat([anchor[..., :D], k], 2), torch.cat([anchor[..., D:], v], 2)


def _equal_parts(length: int, size: int) -> list[int]:
    """`length` tokens in as few parts of at most `size` as can hold them, their lengths differing by one at most."""
    n = -(-length // size)
    return [length // n + (j < length % n) for j in range(n)]
