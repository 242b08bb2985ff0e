"""Attention strategies, chosen by name (`attention=` in the configs): global, ring and star."""

from __future__ import annotations

from typing import Any

from attention.ring import RingAttention
from attention.star import StarAttention
from attention.strategy import AttentionStrategy, GlobalAttention

REGISTRY: dict[str, type[AttentionStrategy]] = {cls.name: cls for cls in (GlobalAttention, RingAttention, StarAttention)}


def build(name: str, **params: Any) -> AttentionStrategy:
    """The strategy registered as `name`, constructed with its parameters (on the current process group)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


__all__ = ["REGISTRY", "AttentionStrategy", "GlobalAttention", "RingAttention", "StarAttention", "build"]
