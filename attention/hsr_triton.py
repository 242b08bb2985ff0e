"""The Triton kernels of HSR sparse decode (attention/hsr.py has the rule; this is the same rule on CUDA).

A step is four launches and a few elementwise ops, with nothing decided on the host:
1. `_bounds`: one program per (batch x KV head, chunk of BLOCK_B blocks) computes the score bounds of its blocks for
   all the head's query rows (u = (q+ . max + q- . min) / sqrt(D), two matrix products in IEEE fp32: a bound must
   not round below a score), -inf for invisible blocks and +inf for the always-read ones, and the exact log-sum-exp
   of its always-read blocks' keys;
2. `_select`: one program per (batch x KV head) folds those into the first read's log-sum-exp L (adding the block
   of highest bound), weighs every block (max over rows of n_b exp(u_b - L)), bins the weights by power of two,
   finds the cut, and writes the head's blocks to read, in key order, with their count and the unread weight;
3. the Lean decode kernel over those tiles, and its combine (`attention.lean.lean_sparse_attend`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from attention import lean

BLOCK_B = 64  # blocks per program of `_bounds`, and per step of `_select`'s passes


@triton.jit
def _row_lse(q, K, KVPOS, base, blk, skn, S, qp, row_ok, window, scale,
             BLOCK: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Exact log-sum-exp per query row of the visible keys of block `blk` (-inf where none)."""
    n = blk * BLOCK + tl.arange(0, BLOCK)
    kp = tl.load(KVPOS + n, mask=n < S, other=-1)
    k = tl.load(K + base + n.to(tl.int64)[:, None] * skn + tl.arange(0, D)[None, :], mask=(n < S)[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    ok = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & row_ok[:, None]
    if HAS_WINDOW:
        ok = ok & (qp[:, None] - kp[None, :] < window)
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return tl.where(total > 0, m_safe + tl.log(total), float("-inf"))


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(m == float("-inf"), m, m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe)))


@triton.jit
def _bounds(
    Q, K, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, U, PLSE,
    sqb, sqh, sqt, skb, skh, skn, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, window, sink, recent, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0)
    qp = tl.load(QPOS + t, mask=row_ok, other=-1)
    first = tl.min(tl.where(row_ok, qp, 2**62), 0)
    last = tl.max(qp, 0)
    blk = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    in_range = blk < NB
    count = tl.load(COUNT + blk, mask=in_range, other=0)
    pmin = tl.load(PMIN + blk, mask=in_range, other=0)
    pmax = tl.load(PMAX + blk, mask=in_range, other=0)
    visible = (count > 0) & (pmin <= last)
    if HAS_WINDOW:
        visible = visible & (pmax > first - window)
    always = visible & ((pmin < sink) | (pmax > last - recent))
    at = b * smb + h * smh + blk.to(tl.int64)[:, None] * smn + d[None, :]
    lo = tl.load(KMIN + at, mask=visible[:, None], other=0.0).to(tl.float32)
    hi = tl.load(KMAX + at, mask=visible[:, None], other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    u = tl.dot(tl.maximum(qf, 0.0), tl.trans(hi), input_precision="ieee")
    u += tl.dot(tl.minimum(qf, 0.0), tl.trans(lo), input_precision="ieee")
    u = tl.where(visible[None, :], u * scale, float("-inf"))
    u = tl.where(always[None, :], float("inf"), u)
    tl.store(U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut + blk[None, :], u, mask=row_ok[:, None] & in_range[None, :])
    # the exact log-sum-exp of this chunk's always-read blocks (most chunks have none)
    lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if tl.sum(always.to(tl.int32), 0) > 0:
        base = b * skb + h * skh
        for i in range(BLOCK_B):
            n = chunk * BLOCK_B + i
            if n < NB:
                c = tl.load(COUNT + n)
                lo_pos = tl.load(PMIN + n)
                hi_pos = tl.load(PMAX + n)
                seen = (c > 0) & (lo_pos <= last)
                if HAS_WINDOW:
                    seen = seen & (hi_pos > first - window)
                if seen & ((lo_pos < sink) | (hi_pos > last - recent)):
                    lse = _logaddexp(lse, _row_lse(q, K, KVPOS, base, n, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE))
    tl.store(PLSE + (head * tl.num_programs(1) + chunk) * BLOCK_M + rows, lse)


@triton.jit
def _weights(u, count, L, row_ok):
    """Per block: max over the rows of count * exp(u - L) (+inf for always-read blocks, 0 for invisible ones)."""
    x = tl.exp(u - L[:, None]) * count[None, :].to(tl.float32)
    x = tl.where((u == float("-inf")) | ~row_ok[:, None], 0.0, x)  # (L = -inf: nothing visible at all)
    x = tl.where(u == float("inf"), float("inf"), x)
    return tl.max(x, 0)


@triton.jit
def _bins(w, low, BINS: tl.constexpr):
    """floor(log2 w) - low, from the float's exponent bits (exact), clamped to -1 (below, w = 0 too) .. BINS (above)."""
    e = ((w.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - low
    e = tl.where(w > 0, e, -1)
    return tl.minimum(tl.maximum(e, -1), BINS)


@triton.jit
def _select(
    Q, K, U, PLSE, COUNT, QPOS, KVPOS, TILES, NREAD, UNREAD, LOUT, VIS,
    sqb, sqh, sqt, skb, skh, skn, sub, suh, sut, Hkv, T, S, NB, chunks, window, eps, low, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    BINS: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_B)
    u_rows = U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut
    # 1. the always-read blocks' log-sum-exp, and the block of highest bound among the others
    L = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for c in range(0, chunks):
        L = _logaddexp(L, tl.load(PLSE + (head * chunks + c) * BLOCK_M + rows))
    best_u = float("-inf")
    best = -1
    visible = 0
    for c0 in range(0, NB, BLOCK_B):
        blk = c0 + cols
        u = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & (blk < NB)[None, :], other=float("-inf"))
        top = tl.max(u, 0)
        visible += tl.sum((top > float("-inf")).to(tl.int32), 0)
        top = tl.where(top == float("inf"), float("-inf"), top)
        i = tl.argmax(top, 0)
        if tl.max(top, 0) > best_u:
            best_u = tl.max(top, 0)
            best = c0 + i
    tl.store(VIS + head, visible)
    qp = tl.load(QPOS + t, mask=row_ok, other=-1)
    if best >= 0:
        q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0)
        L = _logaddexp(L, _row_lse(q, K, KVPOS, b * skb + h * skh, best, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE))
    tl.store(LOUT + head * BLOCK_M + rows, L)
    # 2. the weights' sums per power of two, then the cut: the largest threshold whose blocks below sum to <= eps
    bins = tl.arange(0, BINS)
    hist = tl.zeros([BINS], tl.float32)
    below = 0.0
    for c0 in range(0, NB, BLOCK_B):
        blk = c0 + cols
        u = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & (blk < NB)[None, :], other=float("-inf"))
        count = tl.load(COUNT + blk, mask=blk < NB, other=0)
        w = _weights(u, count, L, row_ok)
        w = tl.where(blk == best, float("inf"), w)
        e = _bins(w, low, BINS)
        below += tl.sum(tl.where(e < 0, w, 0.0), 0)
        hist += tl.sum(tl.where(e[:, None] == bins[None, :], w[:, None], 0.0), 0)
    # S_k = below + hist[0] + ... + hist[k-1] for k = 0 .. BINS: the unread weight if blocks below 2^(low + k) are skipped
    sums = below + tl.sum(tl.where(bins[None, :] < bins[:, None], hist[None, :], 0.0), 1)  # (not cumsum - hist: cancels)
    cut = tl.sum((sums <= eps).to(tl.int32), 0) - 1  # S is nondecreasing and S_0 <= eps
    last_ok = below + tl.sum(hist, 0) <= eps
    cut = tl.where(last_ok, BINS, cut)
    unread = tl.where(last_ok, below + tl.sum(hist, 0), tl.sum(tl.where(bins == cut, sums, 0.0), 0))
    tl.store(UNREAD + head, unread)
    # 3. the blocks to read, in key order
    n_read = 0
    for c0 in range(0, NB, BLOCK_B):
        blk = c0 + cols
        u = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & (blk < NB)[None, :], other=float("-inf"))
        count = tl.load(COUNT + blk, mask=blk < NB, other=0)
        w = _weights(u, count, L, row_ok)
        w = tl.where(blk == best, float("inf"), w)
        read = (_bins(w, low, BINS) >= cut) & (blk < NB)
        at = n_read + tl.cumsum(read.to(tl.int32), 0) - 1
        tl.store(TILES + head * NB + at, blk, mask=read)
        n_read += tl.sum(read.to(tl.int32), 0)
    tl.store(NREAD + head, n_read)


def hsr_attend(q: Tensor, k: Tensor, v: Tensor, mask, summary, eps: float, sink: int, recent: int, bins: int, low: int):
    """`attention.hsr.hsr_attend` on CUDA: (out, lse, certificate, blocks read [B, Hkv], blocks visible)."""
    B, Hq, T, D = q.shape
    Hkv, S, nb, block = k.shape[1], k.shape[2], summary.count.numel(), summary.block
    G = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    BLOCK_M = max(16, triton.next_power_of_2(G * T))
    chunks = triton.cdiv(nb, BLOCK_B)
    u = torch.empty(B, Hq, T, nb, dtype=torch.float32, device=q.device)
    plse = torch.empty(B * Hkv, chunks, BLOCK_M, dtype=torch.float32, device=q.device)
    kmin, kmax = summary.kmin, summary.kmax
    window = mask.window or 0
    common = dict(G=G, BLOCK_M=BLOCK_M, BLOCK_B=BLOCK_B, BLOCK=block, D=D, HAS_WINDOW=mask.window is not None, IEEE=q.dtype.itemsize == 4)
    _bounds[(B * Hkv, chunks)](
        q, k, kmin, kmax, summary.count, summary.pmin, summary.pmax, mask.q_pos, mask.kv_pos, u, plse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), kmin.stride(0), kmin.stride(1),
        kmin.stride(2), u.stride(0), u.stride(1), u.stride(2), Hkv, T, S, nb, window, sink, recent, 1 / math.sqrt(D), **common,
    )  # fmt: skip
    tiles = torch.empty(B * Hkv, nb, dtype=torch.int32, device=q.device)
    n_read = torch.empty(B * Hkv, dtype=torch.int32, device=q.device)
    unread = torch.empty(B * Hkv, dtype=torch.float32, device=q.device)
    L = torch.empty(B * Hkv, BLOCK_M, dtype=torch.float32, device=q.device)
    visible = torch.empty(B * Hkv, dtype=torch.int32, device=q.device)
    _select[(B * Hkv,)](
        q, k, u, plse, summary.count, mask.q_pos, mask.kv_pos, tiles, n_read, unread, L, visible,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), u.stride(0), u.stride(1), u.stride(2),
        Hkv, T, S, nb, chunks, window, eps, low, 1 / math.sqrt(D), BINS=bins, **common,
    )  # fmt: skip
    out, lse = lean.lean_sparse_attend(q, k, v, mask, tiles, n_read, block)
    L = L[:, : G * T].reshape(B, Hq, T)
    certificate = (torch.exp(L - lse) * unread.view(B, Hkv, 1).repeat_interleave(G, 1)).nan_to_num(nan=0.0)
    return out, lse, certificate, n_read.view(B, Hkv), visible[0]
