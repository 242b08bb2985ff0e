"""The local attention kernel every strategy calls: masks from token positions, FlexAttention or a dense path.

A key is visible to a query when it holds a real token (position >= 0), is not in the query's future, and, for
sliding-window layers, lies within the window. Masks are defined on *positions*, not on indices, so a KV cache
whose slots hold non-contiguous positions (a star rank's block, a ring shard) needs no special case.

On CUDA the kernel is compiled FlexAttention with a `BlockMask`; elsewhere it is a dense path that evaluates the
same `mask_mod` on a grid (compiled CPU FlexAttention does not return the log-sum-exp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import torch
from torch import Tensor

# Queries per chunk on the dense path: bounds its score matrix at chunk x keys per head.
DENSE_QUERY_CHUNK = 1024


@dataclass
class PositionMask:
    """Who attends to whom, for one forward pass and one window size; shared by every layer that uses it."""

    q_pos: Tensor  # [T] positions of the queries
    kv_pos: Tensor  # [S] positions held by the key slots; -1 marks an empty slot
    window: int | None = None
    _block_mask: object = field(default=None, repr=False)

    def mask_mod(self) -> Callable:
        q_pos, kv_pos, window = self.q_pos, self.kv_pos, self.window

        def visible(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], kv_pos[kv_idx]
            ok = (kp >= 0) & (kp <= qp)
            if window is not None:
                ok = ok & (qp - kp < window)
            return ok

        return visible

    def dense(self, q_slice: slice = slice(None)) -> Tensor:
        """Boolean [T, S] (or the rows of `q_slice`)."""
        q_idx = torch.arange(self.q_pos.numel(), device=self.q_pos.device)[q_slice, None]
        kv_idx = torch.arange(self.kv_pos.numel(), device=self.kv_pos.device)[None, :]
        return self.mask_mod()(None, None, q_idx, kv_idx)

    def block_mask(self):
        """The FlexAttention `BlockMask`, built on first use and reused by every layer."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block_mask = create_block_mask(
                self.mask_mod(), None, None, self.q_pos.numel(), self.kv_pos.numel(), device=self.q_pos.device
            )
        return self._block_mask


def use_flex(q: Tensor) -> bool:
    return q.is_cuda


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, return_lse: bool = False):
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] (Hq a multiple of Hkv).

    Returns the output [B, Hq, T, D] in q's dtype and, if asked, the natural-log log-sum-exp [B, Hq, T] in fp32
    (-inf on rows that see no key; their output is 0).
    """
    if use_flex(q):
        out, lse = _compiled_flex()(q, k, v, block_mask=mask.block_mask(), enable_gqa=True, return_lse=True)
        return (out, lse.float()) if return_lse else out
    return dense_attend(q, k, v, mask, return_lse)


def dense_attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, return_lse: bool = False):
    """Reference path: fp32 scores, masked softmax, query chunks of DENSE_QUERY_CHUNK."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    qf = q.float().view(B, Hkv, g, T, D) * D**-0.5
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)  # [B, Hkv, 1, S, D]
    outs, lses = [], []
    for start in range(0, T, DENSE_QUERY_CHUNK):
        rows = slice(start, min(start + DENSE_QUERY_CHUNK, T))
        scores = qf[:, :, :, rows] @ kf.transpose(-1, -2)  # [B, Hkv, g, t, S]
        scores = scores.masked_fill(~mask.dense(rows), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(lse.isinf().unsqueeze(-1), 0.0))
        outs.append(probs @ vf)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=3).reshape(B, Hq, T)
