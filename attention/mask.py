"""Who attends to whom, defined on token positions: one rule for global, ring shards, star blocks and sliding windows.

A key is visible to a query when it holds a real token (position >= 0), is not in the query's future, and, for
sliding-window layers, lies within the window; in star's phase 1 it must also be in the query's block or the anchor.
Masks are defined on *positions*, not on indices, so a KV cache whose slots hold non-contiguous positions (a star
rank's block, a ring shard) needs no special case. A mask is built once per forward pass and shared by every layer,
and so are the forms the kernels take it in (`dense`, `pieces`, `block_mask`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from longctx.attention import fused

# Key slots as `PositionMask.seen_keys` gives them: runs [start, end), indices, or None for all
KeySlots = tuple[tuple[int, int], ...] | Tensor | None
MAX_RUNS = 16  # runs of seen key slots kept as runs; more are kept as indices


@dataclass
class PositionMask:
    """Who attends to whom, for one forward pass and one window size; shared by every layer that uses it."""

    q_pos: Tensor  # [T] positions of the queries
    kv_pos: Tensor  # [S] positions held by the key slots; -1 marks an empty slot
    window: int | None = None
    # Star phase 1: a query sees only keys of its own block (positions // block_size) or of the anchor.
    block_size: int | None = None
    anchor_size: int = 0
    _block_mask: object = field(default=None, repr=False)
    _padded: dict = field(default_factory=dict, repr=False)
    _pieces: tuple = field(default=(), repr=False)
    _keys: dict = field(default_factory=dict, repr=False)

    def mask_mod(self) -> Callable:
        q_pos, kv_pos, window, block, anchor = self.q_pos, self.kv_pos, self.window, self.block_size, self.anchor_size

        def visible(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], kv_pos[kv_idx]
            ok = (kp >= 0) & (kp <= qp)
            if window is not None:  # qp - kp < window, without a [queries, keys] difference in int64
                ok = ok & (kp > qp - window)
            if block is not None:
                ok = ok & ((kp // block == qp // block) | (kp < anchor))
            return ok

        return visible

    def dense(self, q_slice: slice = slice(None), keys: KeySlots = None) -> Tensor:
        """Boolean [T, S] (or the rows of `q_slice`, and the key slots `keys` as `seen_keys` gives them)."""
        q_idx = torch.arange(self.q_pos.numel(), device=self.q_pos.device)[q_slice, None]
        kv_idx = torch.arange(self.kv_pos.numel(), device=self.kv_pos.device)
        if isinstance(keys, tuple):
            kv_idx = torch.cat([kv_idx[start:end] for start, end in keys])
        elif keys is not None:
            kv_idx = keys
        return self.mask_mod()(None, None, q_idx, kv_idx[None, :])

    def seen_keys(self, rows: slice) -> KeySlots:
        """The key slots some query of `rows` sees: runs [start, end) of slots (a causal or windowed chunk has one; a
        star block two, the anchor's and its own), their indices where they form more than MAX_RUNS runs, or None
        where every slot is seen, or none (every row stays masked). Found once and shared by every layer: the CPU
        kernels read only these keys, and evaluating the whole [rows, slots] mask again in every layer would cost a
        long context's window layers as much as their attention."""
        if ("seen", rows.start, rows.stop) not in self._keys:
            cols = self.dense(rows).any(0)
            idx = cols.nonzero().squeeze(1)
            keys: KeySlots = None
            if 0 < idx.numel() < cols.numel():
                breaks = (idx[1:] - idx[:-1] != 1).nonzero().squeeze(1) + 1
                if breaks.numel() < MAX_RUNS:
                    starts = idx[torch.cat([breaks.new_zeros(1), breaks])].tolist()
                    ends = (idx[torch.cat([breaks - 1, breaks.new_full((1,), -1)])] + 1).tolist()
                    keys = tuple(zip(starts, ends))
                else:
                    keys = idx
            self._keys["seen", rows.start, rows.stop] = keys
        return self._keys["seen", rows.start, rows.stop]

    def padded(self, queries: int, keys: int) -> "PositionMask":
        """This mask over `queries` and `keys` slots, the added ones at position -1 (nothing sees them and they see
        nothing); built once and shared by every layer, like the block mask."""
        if (queries, keys) not in self._padded:
            q_pos = torch.nn.functional.pad(self.q_pos, (0, queries - self.q_pos.numel()), value=-1)
            kv_pos = torch.nn.functional.pad(self.kv_pos, (0, keys - self.kv_pos.numel()), value=-1)
            self._padded[queries, keys] = PositionMask(q_pos, kv_pos, self.window, self.block_size, self.anchor_size)
        return self._padded[queries, keys]

    def key_ranges(self, size: int) -> list[tuple[int, int]]:
        """[start, end) within each run of `size` slots, from its first to its last slot whose token some query may
        see (causally, and within the window), runs with none left out (every run, whole, while a CUDA graph is being
        captured, which cannot ask); found once and shared by every layer."""
        S = self.kv_pos.numel()
        runs = [(s, min(s + size, S)) for s in range(0, S, size)]
        if self.kv_pos.is_cuda and torch.cuda.is_current_stream_capturing():
            return runs
        if ("ranges", size) not in self._keys:
            kp, qp = self.kv_pos, self.q_pos
            seen = kp >= 0
            if qp.numel() == 0:  # (no query sees anything)
                seen = torch.zeros_like(seen)
            else:
                seen &= kp <= qp.max()
                if self.window is not None:
                    seen &= kp > qp.min() - self.window
            seen = torch.nn.functional.pad(seen, (0, len(runs) * size - S)).view(-1, size)
            at = torch.arange(size, device=kp.device)
            first = torch.where(seen, at, size).amin(1).tolist()
            last = torch.where(seen, at, -1).amax(1).tolist()
            self._keys["ranges", size] = [(s + f, s + e + 1) for (s, _), f, e in zip(runs, first, last) if e >= 0]
        return self._keys["ranges", size]

    def keys(self, start: int, end: int) -> "PositionMask":
        """This mask over the key slots [start, end); built once and shared by every layer."""
        if (start, end) not in self._keys:
            kv_pos = self.kv_pos[start:end]
            self._keys[start, end] = PositionMask(self.q_pos, kv_pos, self.window, self.block_size, self.anchor_size)
        return self._keys[start, end]

    def pieces(self):
        """This mask as full and causal pieces for the fused kernels (`attention.fused.split`), or None; found once
        and shared by every layer, like the block mask."""
        if not self._pieces:
            self._pieces = (fused.split(self.q_pos, self.kv_pos, self.window, self.block_size, self.anchor_size),)
        return self._pieces[0]

    def block_mask(self):
        """The FlexAttention `BlockMask`, built on first use and reused by every layer."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            # _compile: build the mask block by block instead of evaluating mask_mod on the whole
            # [queries, keys] grid, which at 64K tokens takes tens of GB.
            extra = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
            self._block_mask = create_block_mask(
                self.mask_mod(), None, None, self.q_pos.numel(), self.kv_pos.numel(), device=self.q_pos.device, **extra
            )
        return self._block_mask
