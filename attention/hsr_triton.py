"""The Triton kernel of HSR's score bounds (attention/hsr.py): every block of every KV head in one launch.

One program per (batch x KV head, chunk of BLOCK_B blocks) holds the head's query rows (its query heads x query
tokens) and computes u = (q+ . max + q- . min) / sqrt(D) for the chunk as two matrix products, in IEEE fp32: the
bound must not round below a score the attention kernel computes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_B = 64  # blocks per program


@triton.jit
def _bounds(
    Q, KMIN, KMAX, COUNT, U, sqb, sqh, sqt, skb, skh, skn, sub, suh, sut, Hkv, T, NB, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    blk = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    filled = tl.load(COUNT + blk, mask=blk < NB, other=0) > 0
    at = b * skb + h * skh + blk.to(tl.int64)[:, None] * skn + d[None, :]
    lo = tl.load(KMIN + at, mask=filled[:, None], other=0.0).to(tl.float32)
    hi = tl.load(KMAX + at, mask=filled[:, None], other=0.0).to(tl.float32)
    u = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
    u += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
    u = tl.where(filled[None, :], u * scale, float("-inf"))
    tl.store(U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut + blk[None, :], u, mask=row_ok[:, None] & (blk < NB)[None, :])


def bounds(q: Tensor, summary) -> Tensor:
    """u [B, Hq, T, blocks] fp32 (`attention.hsr.score_bounds`)."""
    B, Hq, T, D = q.shape
    Hkv, nb = summary.kmin.shape[1], summary.count.numel()
    q = q if q.stride(-1) == 1 else q.contiguous()
    u = torch.empty(B, Hq, T, nb, dtype=torch.float32, device=q.device)
    kmin, kmax = summary.kmin, summary.kmax
    _bounds[(B * Hkv, triton.cdiv(nb, BLOCK_B))](
        q, kmin, kmax, summary.count, u, q.stride(0), q.stride(1), q.stride(2), kmin.stride(0), kmin.stride(1),
        kmin.stride(2), u.stride(0), u.stride(1), u.stride(2), Hkv, T, nb, 1 / math.sqrt(D),
        G=Hq // Hkv, BLOCK_M=max(16, triton.next_power_of_2(Hq // Hkv * T)), BLOCK_B=BLOCK_B, D=D,
    )  # fmt: skip
    return u
