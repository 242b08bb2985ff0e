"""The KV cache: one object that owns every layer's keys and values, the positions its slots hold and how full it is.

The model holds it (`Transformer.setup_cache`) and hands each layer's part to the attention strategy; strategies
claim slots (`reserve`), write them (`LayerKV.write`) and read positions from it, never from the model. Slots are
claimed in order: a device counter (`fill`) says where the next token goes, so that a decode step captured in a
CUDA graph claims the next slot on every replay; `used` mirrors it on the host for capacity checks.

A decode method that reads the cache selectively may ask for a summary of every block of slots (`summarize`): an
object made per layer, told of every write (`update(slots, k, positions)`) and of a reset (`reset()`). The cache
does not know what it summarizes.

How the layer's tokens are stored is the cache's alone: they are written through `LayerKV.write` and read from the
layer's tensors, so a stored dtype other than the model's, with whatever per-block scales it needs, lives in
`LayerKV` beside `k` and `v`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from longctx.attention.fusion import fused_on_cuda


class BlockSummary(Protocol):
    """What a decode method keeps per layer beside the keys (attention.hsr.KeySummary is one)."""

    def update(self, slots: Tensor, k: Tensor, positions: Tensor) -> None: ...

    def reset(self) -> None: ...


class Summarize(Protocol):
    """Makes one layer's summary for a cache of this shape."""

    def __call__(
        self, batch: int, kv_heads: int, slots: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> BlockSummary: ...


@fused_on_cuda
def write_kv(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    k_cache[:, :, slots] = k.to(k_cache.dtype)
    v_cache[:, :, slots] = v.to(v_cache.dtype)


@dataclass
class LayerKV:
    """One layer's keys and values [batch, kv_heads, slots, head_dim], the positions of the slots (shared by every
    layer) and the summary a decode method asked for."""

    k: Tensor
    v: Tensor
    positions: Tensor
    summary: Any = None

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' k, v [B, Hkv, n, D] at `slots` (claimed by `KVCache.reserve`); returns the whole
        layer's keys and values."""
        write_kv(self.k, self.v, slots, k, v)
        if self.summary is not None:
            self.summary.update(slots, k, self.positions[slots])
        return self.k, self.v


@dataclass
class Claim:
    """Slots a captured step claims on every replay (`KVCache.capture`)."""

    slots: int = 0


class KVCache:
    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        slots: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        summarize: Summarize | None = None,
    ):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=device)  # -1: empty
        self.fill = torch.zeros((), dtype=torch.long, device=device)
        self.used = 0
        shape = (batch, kv_heads, slots, head_dim)
        self.layers = [
            LayerKV(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                self.positions,
                summarize(batch, kv_heads, slots, head_dim, device, dtype) if summarize else None,
            )
            for _ in range(layers)
        ]

    @property
    def capacity(self) -> int:
        return self.positions.numel()

    def reserve(self, positions: Tensor) -> Tensor:
        """Claim the next slots for tokens at `positions`; returns their indices (on the device, no host sync)."""
        n = positions.numel()
        if self.used + n > self.capacity:
            raise ValueError(
                f"KV cache holds {self.capacity} tokens: {self.used} used, {n} more do not fit; call setup_cache with more slots"
            )
        slots = self.fill + torch.arange(n, device=positions.device)
        self.positions.index_copy_(0, slots, positions)
        self.fill += n
        self.used += n
        return slots

    def reset(self) -> None:
        """Empty: every slot free, every summary back to that of an empty cache (the tensors stay allocated)."""
        for layer in self.layers:
            if layer.summary is not None:
                layer.summary.reset()
        self.positions.fill_(-1)
        self.fill.zero_()
        self.used = 0

    @contextmanager
    def capture(self) -> Iterator[Claim]:
        """For capturing a step into a CUDA graph: capture records the step's work without running it, so the host
        count goes back to where it was, and the claim says what each replay claims (`replayed`)."""
        claim, before = Claim(), self.used
        try:
            yield claim
        finally:
            claim.slots, self.used = self.used - before, before

    def replayed(self, claim: Claim) -> None:
        """A captured step ran once more: the host count follows the device counter."""
        self.used += claim.slots

    def kv_bytes(self) -> int:
        """Bytes of the keys and values themselves."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
