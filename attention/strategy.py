"""What a strategy is: how a forward pass's queries attend to keys, possibly spread over ranks.

The model calls a strategy twice per forward pass: `masks` once (shared by all layers), then `attend` in every
layer with that layer's mask. `GlobalAttention` is exact attention on one rank, the reference for the others.
"""

from __future__ import annotations

from torch import Tensor

from attention.kernels import PositionMask, attend


class AttentionStrategy:
    name: str = ""

    def masks(self, q_pos: Tensor, kv_pos: Tensor, windows: set[int | None]) -> dict[int | None, PositionMask]:
        """One mask per distinct sliding window of the model, for queries at `q_pos` over slots at `kv_pos`."""
        return {w: PositionMask(q_pos, kv_pos, w) for w in windows}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: PositionMask) -> Tensor:
        raise NotImplementedError


class GlobalAttention(AttentionStrategy):
    """Exact causal attention on one rank."""

    name = "global"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: PositionMask) -> Tensor:
        return attend(q, k, v, mask)
