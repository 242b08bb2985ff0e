"""Attention strategies (`attention=`: global, ring, star) and decode methods (`decode=`: dense, hsr, window), by name.

A new strategy or decode method is a new module attention/NAME.py whose class registers itself under NAME, and a
conf/attention/NAME.yaml or conf/decode/NAME.yaml: attention/README.md walks through one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from longctx.attention.decode import DECODE_METHODS, DecodeMethod, DenseDecode, build_decode, decode_class
from longctx.attention.ring import RingAttention
from longctx.attention.star import StarAttention
from longctx.attention.strategy import STRATEGIES, AttentionStrategy, GlobalAttention, strategy_class


def build(name: str, decode: DecodeMethod | None = None, **params: Any) -> AttentionStrategy:
    """The strategy registered as `name`, constructed with its parameters and decode method (default: dense), on
    the current process group."""
    return strategy_class(name)(decode=decode, **params)


def from_config(
    attention: Mapping,
    decode: Mapping | None,
    n_ctx: int,
    world: int,
    group=None,
    kv_dtype: torch.dtype | None = None,
    chunk: int | None = None,
) -> AttentionStrategy:
    """The strategy an `attention` config node and a `decode` one describe, for a context of `n_ctx` tokens over
    `world` ranks (the ranks of `group`, the context-parallel group; None: all ranks), its KV cache stored in
    `kv_dtype` (None: the model's) and its phase 1 fed `chunk` tokens per pass (None: the strategy's default)."""
    strategy = strategy_class(attention["name"]).from_config(
        attention, n_ctx, world, group=group, decode=build_decode(decode)
    )
    strategy.kv_dtype, strategy.chunk = kv_dtype, chunk
    return strategy


__all__ = [
    "DECODE_METHODS",
    "STRATEGIES",
    "AttentionStrategy",
    "DecodeMethod",
    "DenseDecode",
    "GlobalAttention",
    "RingAttention",
    "StarAttention",
    "build",
    "build_decode",
    "decode_class",
    "from_config",
    "strategy_class",
]
