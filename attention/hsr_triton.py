"""The Triton kernels of HSR sparse decode (attention/hsr.py has the rule; this is the same rule on CUDA).

A step is six launches and a few elementwise ops, with nothing decided on the host, every kernel spread over the
blocks of each head as well as over heads:
1. `_bounds` (per batch x KV head, BLOCK_B blocks): the score bounds of its blocks for all the head's query rows
   (u = (q+ . max + q- . min) / sqrt(D): tensor-core products for 16-bit keys, whose products are exact in the fp32
   accumulator, IEEE fp32 otherwise, so that a bound never rounds below a score), -inf for invisible blocks and
   +inf for the always-read ones; the exact log-sum-exp of its always-read blocks' keys; its block of highest
   bound among the others;
2. `_weigh` (per batch x KV head, CHUNK blocks): L, the first read's log-sum-exp (`_first_lse`: the always-read
   blocks and the best one); each block's weight (max over rows of n_b exp(u_b - L)), binned by its power of two;
   the chunk's sum and count per bin;
3. `_cut` (same grid): the head's cut from all chunks' sums, then the chunk's blocks to read, written in key order
   after those of the chunks before it;
4. the Lean decode kernel over those lists, and its combine (`attention.lean.lean_sparse_attend`);
5. `_certificate`: exp(L - lse) times the head's unread weight.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from attention import lean
from attention.lean_triton import masked_scores

BLOCK_B = 64  # blocks per program of `_bounds`, and per step of the other kernels' loops
CHUNK = 128  # blocks per program of `_weigh` and `_cut` at least; more where a head has over MAX_CHUNKS of them
MAX_CHUNKS = 64  # (each of those programs reads every chunk's figures: more chunks cost more than they spread)


@triton.jit
def _row_lse(q, K, KVPOS, base, blk, skn, S, qp, row_ok, window, scale,
             BLOCK: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Exact log-sum-exp per query row of the visible keys of block `blk` (-inf where none)."""
    n = blk * BLOCK + tl.arange(0, BLOCK)
    kp = tl.load(KVPOS + n, mask=n < S, other=-1)
    k = tl.load(K + base + n.to(tl.int64)[:, None] * skn + tl.arange(0, D)[None, :], mask=(n < S)[:, None], other=0.0)
    s = masked_scores(q, k, kp, qp, row_ok, window, scale, HAS_WINDOW, IEEE)
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
    Q, K, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, U, PLSE, BEST_U, BEST_I, VIS,
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
    lo = tl.load(KMIN + at, mask=visible[:, None], other=0.0)
    hi = tl.load(KMAX + at, mask=visible[:, None], other=0.0)
    if IEEE:
        u = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
        u += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
    else:  # bf16/fp16 operands: every product is exact in the fp32 accumulator, as in the attention kernel's scores
        u = tl.dot(tl.maximum(q, 0.0).to(hi.dtype), tl.trans(hi))
        u += tl.dot(tl.minimum(q, 0.0).to(lo.dtype), tl.trans(lo))
    u = tl.where(visible[None, :], u * scale, float("-inf"))
    u = tl.where(always[None, :], float("inf"), u)
    tl.store(U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut + blk[None, :], u, mask=row_ok[:, None] & in_range[None, :])
    # this chunk's block of highest bound among the visible ones not always read, and its visible blocks
    top = tl.max(tl.where(row_ok[:, None], u, float("-inf")), 0)
    top = tl.where(always, float("-inf"), top)
    at_chunk = head * tl.num_programs(1) + chunk
    tl.store(BEST_U + at_chunk, tl.max(top, 0))
    tl.store(BEST_I + at_chunk, chunk * BLOCK_B + tl.argmax(top, 0))
    tl.store(VIS + at_chunk, tl.sum(visible.to(tl.int32), 0))
    # the exact log-sum-exp of this chunk's always-read blocks (most chunks have none)
    lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
    base = b * skb + h * skh
    lanes = tl.arange(0, BLOCK_B)
    todo = always.to(tl.int32)
    while tl.sum(todo, 0) > 0:  # one step per always-read block (most chunks have none)
        i = tl.argmax(todo, 0)
        lse = _logaddexp(lse, _row_lse(q, K, KVPOS, base, chunk * BLOCK_B + i, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE))
        todo = tl.where(lanes == i, 0, todo)
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
    """1 + floor(log2 w) - low from the float's exponent bits (exact), clamped: 0 below 2^low (and w = 0), BINS + 1
    at or above 2^(low + BINS) (and inf)."""
    e = ((w.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - low
    e = tl.where(w > 0, e, -1)
    return tl.minimum(tl.maximum(e, -1), BINS) + 1


@triton.jit
def _first_lse(PLSE, BEST_U, BEST_I, VIS, head, chunks, rows, BLOCK_M: tl.constexpr, CB: tl.constexpr):
    """The always-read blocks' log-sum-exp per row, the head's other block of highest bound (-1: none), its visible
    blocks: reduced from `_bounds`' per-chunk figures."""
    L = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_u = float("-inf")
    best = -1
    visible = 0
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        ok = c < chunks
        part = tl.load(PLSE + (head * chunks + c)[:, None] * BLOCK_M + rows[None, :], mask=ok[:, None], other=float("-inf"))
        m = tl.max(part, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        L = _logaddexp(L, tl.where(m == float("-inf"), m, m_safe + tl.log(tl.sum(tl.exp(part - m_safe[None, :]), 0))))
        top = tl.load(BEST_U + head * chunks + c, mask=ok, other=float("-inf"))
        i = tl.argmax(top, 0)
        if tl.max(top, 0) > best_u:
            best_u = tl.max(top, 0)
            best = tl.load(BEST_I + head * chunks + c0 + i)
        visible += tl.sum(tl.load(VIS + head * chunks + c, mask=ok, other=0), 0)
    return L, best, visible


@triton.jit
def _weigh(
    Q, K, QPOS, KVPOS, U, COUNT, PLSE, BEST_U, BEST_I, VIS, LOUT, VISIBLE, EB, HSUM, HCNT,
    sqb, sqh, sqt, skb, skh, skn, sub, suh, sut, Hkv, T, S, NB, chunks, window, scale, low,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    CHUNK: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): L (every program of the head computes it; the first stores it), then
    each block's weight bin, and the chunk's sum and count of weights per bin."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    L, best, visible = _first_lse(PLSE, BEST_U, BEST_I, VIS, head, chunks, rows, BLOCK_M, CB)
    if best >= 0:
        qp = tl.load(QPOS + t, mask=row_ok, other=-1)
        q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
        L = _logaddexp(L, _row_lse(q, K, KVPOS, b * skb + h * skh, best, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE))
    if chunk == 0:
        tl.store(LOUT + head * BLOCK_M + rows, L)
        tl.store(VISIBLE + head, visible)
    bins = tl.arange(0, HB)
    sums = tl.zeros([HB], tl.float32)
    counts = tl.zeros([HB], tl.int32)
    u_rows = U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut
    for c0 in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, NB), BLOCK_B):
        blk = c0 + tl.arange(0, BLOCK_B)
        ok = blk < tl.minimum(chunk * CHUNK + CHUNK, NB)
        u = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & ok[None, :], other=float("-inf"))
        w = _weights(u, tl.load(COUNT + blk, mask=ok, other=0), L, row_ok)
        w = tl.where(blk == best, float("inf"), w)
        e = _bins(w, low, BINS)
        tl.store(EB + head.to(tl.int64) * NB + blk, e.to(tl.int8), mask=ok)
        hit = (e[:, None] == bins[None, :]) & ok[:, None]
        sums += tl.sum(tl.where(hit & (e[:, None] <= BINS), w[:, None], 0.0), 0)
        counts += tl.sum(hit.to(tl.int32), 0)
    at = (head * tl.num_programs(1) + chunk) * HB + bins
    tl.store(HSUM + at, sums)
    tl.store(HCNT + at, counts)


@triton.jit
def _cut(
    EB, HSUM, HCNT, TILES, NREAD, UNREAD, NB, chunks, eps,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): the head's cut from all chunks' sums (the largest power of two whose
    weights below sum to <= eps), then this chunk's blocks at or above it written to the head's list in key order."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    bins = tl.arange(0, HB)
    sums = tl.zeros([HB], tl.float32)
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        sums += tl.sum(tl.load(HSUM + (head * chunks + c)[:, None] * HB + bins[None, :], mask=(c < chunks)[:, None], other=0.0), 0)
    # below[k]: the weights in bins < k (bin 0: under 2^low), for k = 1 .. BINS + 1 (skipping bins below k)
    below = tl.sum(tl.where(bins[None, :] < bins[:, None], sums[None, :], 0.0), 1)
    cut = tl.max(tl.where((below <= eps) & (bins >= 1) & (bins <= BINS + 1), bins, 1), 0)  # below[1] <= eps / 2
    unread = tl.sum(tl.where(bins == cut, below, 0.0), 0)
    # where this chunk's blocks go: after the blocks read in the chunks before it
    offset = 0
    total = 0
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        n = tl.sum(tl.load(HCNT + (head * chunks + c)[:, None] * HB + bins[None, :], mask=(c < chunks)[:, None] & (bins >= cut)[None, :], other=0), 1)
        offset += tl.sum(tl.where(c < chunk, n, 0), 0)
        total += tl.sum(n, 0)
    if chunk == 0:
        tl.store(NREAD + head, total)
        tl.store(UNREAD + head, unread)
    end = tl.minimum(chunk * CHUNK + CHUNK, NB)
    for c0 in range(chunk * CHUNK, end, BLOCK_B):
        blk = c0 + tl.arange(0, BLOCK_B)
        read = (tl.load(EB + head.to(tl.int64) * NB + blk, mask=blk < end, other=0).to(tl.int32) >= cut) & (blk < end)
        at = offset + tl.cumsum(read.to(tl.int32), 0) - 1
        tl.store(TILES + head.to(tl.int64) * NB + at, blk, mask=read)
        offset += tl.sum(read.to(tl.int32), 0)


@triton.jit
def _certificate(L, LSE, UNREAD, CERT, rows, G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """c = exp(L - lse) * (the head's unread weight), 0 where nothing is unread."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (batch, query head, token)
    ok = i < rows
    head = i // (G * T)  # (batch x KV head)
    r = i % (G * T)
    unread = tl.load(UNREAD + head, mask=ok, other=0.0)
    gap = tl.load(L + head * BLOCK_M + r, mask=ok, other=0.0) - tl.load(LSE + i, mask=ok, other=0.0)
    tl.store(CERT + i, tl.where(unread > 0, tl.exp(gap) * unread, 0.0), mask=ok)


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
    best_u = torch.empty(B * Hkv, chunks, dtype=torch.float32, device=q.device)
    best_i = torch.empty(B * Hkv, chunks, dtype=torch.int32, device=q.device)
    vis = torch.empty(B * Hkv, chunks, dtype=torch.int32, device=q.device)
    _bounds[(B * Hkv, chunks)](
        q, k, kmin, kmax, summary.count, summary.pmin, summary.pmax, mask.q_pos, mask.kv_pos, u, plse, best_u, best_i, vis,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), kmin.stride(0), kmin.stride(1),
        kmin.stride(2), u.stride(0), u.stride(1), u.stride(2), Hkv, T, S, nb, window, sink, recent, 1 / math.sqrt(D), **common,
    )  # fmt: skip
    L = torch.empty(B * Hkv, BLOCK_M, dtype=torch.float32, device=q.device)
    visible = torch.empty(B * Hkv, dtype=torch.int32, device=q.device)
    chunk = max(CHUNK, triton.next_power_of_2(triton.cdiv(nb, MAX_CHUNKS)))
    wide = triton.cdiv(nb, chunk)
    hb = triton.next_power_of_2(bins + 2)
    eb = torch.empty(B * Hkv, nb, dtype=torch.int8, device=q.device)
    hsum = torch.empty(B * Hkv, wide, hb, dtype=torch.float32, device=q.device)
    hcnt = torch.empty(B * Hkv, wide, hb, dtype=torch.int32, device=q.device)
    _weigh[(B * Hkv, wide)](
        q, k, mask.q_pos, mask.kv_pos, u, summary.count, plse, best_u, best_i, vis, L, visible, eb, hsum, hcnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), u.stride(0), u.stride(1), u.stride(2),
        Hkv, T, S, nb, chunks, window, 1 / math.sqrt(D), low, CHUNK=chunk, BINS=bins, HB=hb, CB=64, **common,
    )  # fmt: skip
    tiles = torch.empty(B * Hkv, nb, dtype=torch.int32, device=q.device)
    n_read = torch.empty(B * Hkv, dtype=torch.int32, device=q.device)
    unread = torch.empty(B * Hkv, dtype=torch.float32, device=q.device)
    _cut[(B * Hkv, wide)](eb, hsum, hcnt, tiles, n_read, unread, nb, wide, eps, BLOCK_B=BLOCK_B, CHUNK=chunk, BINS=bins, HB=hb, CB=64)
    out, lse = lean.lean_sparse_attend(q, k, v, mask, tiles, n_read, block)
    certificate = torch.empty_like(lse)
    _certificate[(triton.cdiv(lse.numel(), 256),)](L, lse, unread, certificate, lse.numel(), G=G, T=T, BLOCK_M=BLOCK_M, BLOCK=256)
    return out, lse, certificate, n_read.view(B, Hkv), visible[0]
