"""The KV cache: one object that owns every layer's keys and values, the positions its slots hold and how full it is.

The model holds it (`Transformer.setup_cache`) and hands each layer's part to the attention strategy; strategies
claim slots (`reserve`), write them (`LayerKV.write`) and read positions from it, never from the model. Slots are
claimed in order: a device counter (`fill`) says where the next token goes, so that a decode step captured in a
CUDA graph claims the next slot on every replay; `used` mirrors it on the host for capacity checks.

A decode method that reads the cache selectively may ask for a summary of every block of slots (`summarize`): an
object made per layer, told of every write (`update(slots, k, positions)`) and of a reset (`reset()`). The cache
does not know what it summarizes.

How the layer's tokens are stored is the cache's alone: they are written through `LayerKV.write`, and a reader takes
the layer's tensors with their `scales`. In one byte (FP8 or int8, attention/quant.py) each token's keys and values keep
one scale per KV head beside them (its exponent, a byte), and the values are kept in tiles of keys, transposed
(`attention.quant.tile_values`: for the decode kernel's products); the kernels read them as they are stored
(`attention.kernels.attend(..., scales=)`), never from a full-width copy of the cache, and phase 1 attends to its new
tokens as the cache will give them back (`LayerKV.stored`), so that every strategy, chunk and rank count reads the same
numbers.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import torch
from torch import Tensor

from longctx.attention import lean
from longctx.attention.fusion import fused_on_cuda
from longctx.attention.quant import (
    VALUE_TILE,
    dequantize,
    is_quantized,
    pack,
    quantize,
    round_trip,
    store_value_rows,
    value_rows,
    value_tiles,
)


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


@fused_on_cuda
def write_kv_quantized(
    k_cache: Tensor, v_cache: Tensor, k_scale: Tensor, v_scale: Tensor, slots: Tensor, k: Tensor, v: Tensor
) -> None:
    k_cache[:, :, slots], k_scale[:, :, slots] = quantize(k, k_cache.dtype)
    codes, v_scale[:, :, slots] = quantize(v, v_cache.dtype)
    store_value_rows(v_cache, slots, codes)


def kernel_writes(x: Tensor) -> bool:
    """Whether new keys and values like x go to a one-byte cache in one Triton kernel (attention/quant_triton.py, the
    codes of `write_kv_quantized` bit for bit, in one launch where a compiled one is several): on CUDA, for a
    power-of-two head dim."""
    D = x.shape[-1]
    return x.is_cuda and 16 <= D <= 256 and D & (D - 1) == 0 and lean.triton_available()


@cache
def _write_kernel():
    return importlib.import_module("longctx.attention.quant_triton")


@dataclass
class LayerKV:
    """One layer's keys and values [batch, kv_heads, slots, head_dim], the positions of the slots (shared by every
    layer), the summary a decode method asked for, and in one byte the scales [batch, kv_heads, slots] of each slot
    (int8 exponents: `attention.quant`), with the values in tiles of keys (`attention.quant.tile_values`)."""

    k: Tensor
    v: Tensor
    positions: Tensor
    summary: Any = None
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None

    @property
    def scales(self) -> tuple[Tensor, Tensor] | None:
        """(key scales, value scales) as exponents where the slots are stored in one byte; None at full width."""
        return None if self.k_scale is None else (self.k_scale, self.v_scale)

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' k, v [B, Hkv, n, D] at `slots` (claimed by `KVCache.reserve`); returns the whole
        layer's keys and values (as stored: read them with `scales`)."""
        if self.k_scale is None:
            write_kv(self.k, self.v, slots, k, v)
        elif kernel_writes(k):
            _write_kernel().write(self.k, self.v, self.k_scale, self.v_scale, slots, k, v)
        else:
            write_kv_quantized(self.k, self.v, self.k_scale, self.v_scale, slots, k, v)
        if self.summary is not None:  # of the keys as they will be read (one byte: in the stored frame)
            stored = k if self.k_scale is None else dequantize(self.k[:, :, slots], self.k_scale[:, :, slots], k.dtype)
            self.summary.update(slots, stored, self.positions[slots])
        return self.k, self.v

    def packed(self, slots: Tensor | slice) -> Tensor:
        """The keys and values of `slots` as stored, in one tensor to send (`attention.quant.pack`)."""
        scales = None if self.k_scale is None else (self.k_scale[:, :, slots], self.v_scale[:, :, slots])
        return pack(self.k[:, :, slots], value_rows(self.v, slots), scales)

    def stored(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v as this cache gives them back once written, in their own dtype."""
        if self.k_scale is None:
            return k.to(self.k.dtype).to(k.dtype), v.to(self.v.dtype).to(v.dtype)
        return round_trip(k, self.k.dtype), round_trip(v, self.v.dtype)


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
        compute_dtype: torch.dtype | None = None,
    ):
        """`dtype`: how keys and values are stored (FP8 or int8: with per-token scales, attention/quant.py);
        `compute_dtype`: the model's, in which summaries are kept (default: `dtype`)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        compute_dtype = compute_dtype or dtype
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=device)  # -1: empty
        self.fill = torch.zeros((), dtype=torch.long, device=device)
        self.used = 0
        shape = (batch, kv_heads, slots, head_dim)
        one_byte = is_quantized(dtype)
        v_shape = (batch, kv_heads, value_tiles(slots), head_dim, VALUE_TILE) if one_byte else shape
        scaled = lambda: torch.zeros(shape[:3], dtype=torch.int8, device=device) if one_byte else None  # noqa: E731
        self.layers = [
            LayerKV(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(v_shape, dtype=dtype, device=device),
                self.positions,
                summarize(batch, kv_heads, slots, head_dim, device, compute_dtype) if summarize else None,
                scaled(),
                scaled(),
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
        """Bytes of the keys and values themselves, with their scales."""
        return sum(sum(t.nbytes for t in (layer.k, layer.v, *(layer.scales or ()))) for layer in self.layers)
