"""Attention strategies, chosen by name (`attention=` in the configs): global, ring and star."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from longctx.attention.ring import RingAttention
from longctx.attention.star import StarAttention, star_block_size
from longctx.attention.strategy import AttentionStrategy, GlobalAttention

REGISTRY: dict[str, type[AttentionStrategy]] = {cls.name: cls for cls in (GlobalAttention, RingAttention, StarAttention)}


def build(name: str, **params: Any) -> AttentionStrategy:
    """The strategy registered as `name`, constructed with its parameters (on the current process group)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


def from_config(cfg: Mapping, n_ctx: int, world: int, group=None) -> AttentionStrategy:
    """The strategy an `attention=` config group describes, for a context of `n_ctx` tokens over `world` ranks (the
    ranks of `group`, the context-parallel group; None: all ranks): star's block size, where the config leaves it
    null, is the default rule's (`star_block_size`)."""
    params = dict(cfg.get("params") or {})
    if cfg["name"] == "star" and params.get("block_size") is None:
        params["block_size"] = star_block_size(n_ctx, world, cfg.get("min_block_size") or 0)
    return build(cfg["name"], group=group, **params)


__all__ = ["REGISTRY", "AttentionStrategy", "GlobalAttention", "RingAttention", "StarAttention", "build", "from_config"]
