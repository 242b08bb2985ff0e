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

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention.kernels import PositionMask, attend
from longctx.attention.strategy import AttentionStrategy, Step

ANCHOR_MODES = ("broadcast", "recompute")


def star_block_size(n_ctx: int, world: int, min_block: int) -> int:
    """Star's default block: a quarter of the context (context / ranks beyond 4 ranks), but not below `min_block`
    tokens, so that a short context runs as fewer, longer blocks (one exact block on one rank), as long as every
    rank still gets a block. ACCURACY.md has the measurements behind the floor; attention/README.md the trade-off."""
    quarter = -(-n_ctx // max(4, world))
    return max(1, quarter, min(min_block, -(-n_ctx // world)))


class StarAttention(AttentionStrategy):
    name = "star"

    def __init__(
        self,
        block_size: int,
        anchor_size: int | None = None,
        anchor_mode: str = "broadcast",
        group: dist.ProcessGroup | None = None,
        **decode_options,
    ):
        super().__init__(group, **decode_options)
        anchor_size = block_size if anchor_size is None else anchor_size
        if block_size <= 0:
            raise ValueError(f"star block_size must be > 0; got {block_size}")
        if not 0 < anchor_size <= block_size:
            raise ValueError(f"star anchor_size must be in 1..block_size ({block_size}); got {anchor_size}")
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"star anchor_mode must be one of {ANCHOR_MODES}; got {anchor_mode!r}")
        self.block_size, self.anchor_size, self.anchor_mode = block_size, anchor_size, anchor_mode

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

    def kept_context(self, n_ctx: int) -> int:
        start, end = self.own_range(n_ctx)
        return end - start

    def begin_context(self, model, positions: Tensor, windows: set[int | None]) -> Step:
        if model.has_cache and model.cache_len:
            raise ValueError("star phase 1 starts from an empty KV cache; call model.reset_cache() first")
        skip = int((positions < self.anchor_size).sum()) if self.recomputes_anchor else 0
        anchor = torch.arange(self.anchor_size, device=positions.device)
        kv_pos = torch.cat([anchor, positions]) if self.receives_anchor else positions
        slots = model.reserve(positions[skip:]) if model.has_cache else None
        masks = {w: PositionMask(positions, kv_pos, w, self.block_size, self.anchor_size) for w in windows}
        return Step("context", masks, slots, skip)

    def attend_context(self, q: Tensor, k: Tensor, v: Tensor, cache, step: Step, window: int | None) -> Tensor:
        if step.slots is not None:
            cache.update(step.slots, k[:, :, step.skip :], v[:, :, step.skip :])
        if self.anchor_mode == "broadcast" and self.world > 1:
            k, v = self._share_anchor(k, v)
        return attend(q, k, v, step.masks[window])

    def _share_anchor(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Rank 0 sends the anchor's K/V of this layer; the others put it in front of their own."""
        B, H, _, D = k.shape
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        if not self.receives_anchor:
            dist.broadcast(torch.cat([k[:, :, : self.anchor_size], v[:, :, : self.anchor_size]], -1).contiguous(), src, self.group)
            return k, v
        anchor = torch.empty(B, H, self.anchor_size, 2 * D, dtype=k.dtype, device=k.device)
        dist.broadcast(anchor, src, self.group)
        return torch.cat([anchor[..., :D], k], 2), torch.cat([anchor[..., D:], v], 2)
