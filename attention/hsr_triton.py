"""The Triton kernels of HSR sparse decode (attention/hsr.py has the rule; this is the same rule on CUDA).

A step is five launches, with nothing decided on the host, every kernel spread over the blocks of each head as well
as over heads. Each kernel's own latency is what a step at a small share costs, so none waits on a chain of
dependent loads where it can be avoided:
1. `_bounds`, two kinds of program per batch x KV head:
   - per ITERS x BLOCK_B blocks: the score bounds of its blocks for all the head's query rows (u = (q+ . max +
     q- . min) / sqrt(D): tensor-core products for 16-bit keys, whose products are exact in the fp32 accumulator,
     IEEE fp32 otherwise, so that a bound never rounds below a score), -inf for invisible blocks and +inf for the
     always-read ones; its block of highest bound among the others, and that block's exact log-sum-exp;
   - ALWAYS programs that share out the always-read blocks (the a-th takes those of rank a mod ALWAYS) and sum
     their exact log-sum-exp, so that the sink and the recent blocks are not read one after another;
2. `_weigh` (per batch x KV head, CHUNK blocks): L, the first read's log-sum-exp (`_first_lse`: the always-read
   blocks and the head's best other block, both taken from `_bounds`' figures); each block's weight (max over rows
   of n_b exp(u_b - L)), binned by its power of two; the chunk's sum and count per bin;
3. `_cut` (same grid): the head's cut from all chunks' sums, then the chunk's blocks to read, written in key order
   after those of the chunks before it;
4. the Lean decode kernel over those lists, and its combine, which also writes the certificate exp(L - lse) times
   the head's unread weight (`attention.lean.lean_sparse_attend`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from attention import lean
from attention.hsr import DENSE_SHARE, PROBE_EVERY
from attention.lean_triton import masked_scores

BLOCK_B = 64  # blocks per step of every kernel's loop over blocks
ALWAYS = 8  # programs per head that read the always-read blocks in `_bounds`
SCAN = 1024  # blocks those programs look at per step, to find theirs
BOUNDS_PROGRAMS = 128  # `_bounds` programs per launch at most (up to 8 x BLOCK_B blocks each), beyond ALWAYS
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
def _roles(COUNT, PMIN, PMAX, blk, NB, first, last, window, sink, recent, HAS_WINDOW: tl.constexpr):
    """(visible, always) of blocks `blk`, as `attention.hsr.block_roles` says."""
    in_range = blk < NB
    count = tl.load(COUNT + blk, mask=in_range, other=0)
    pmin = tl.load(PMIN + blk, mask=in_range, other=0)
    pmax = tl.load(PMAX + blk, mask=in_range, other=0)
    visible = (count > 0) & (pmin <= last)
    if HAS_WINDOW:
        visible = visible & (pmax > first - window)
    return visible, visible & ((pmin < sink) | (pmax > last - recent))


@triton.jit
def _bounds(
    Q, K, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, LEFT, U, PLSE, BEST_U, BEST_I, BEST_LSE, VIS,
    sqb, sqh, sqt, skb, skh, skn, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, chunks, window, sink, recent, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, ALWAYS: tl.constexpr, SCAN: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Visible blocks are the same for every head (positions are): head 0 counts them (VIS), whether or not it reads
    every block this step (LEFT > 0); another head that does returns at once."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    d = tl.arange(0, D)
    left = tl.load(LEFT + head)
    q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=(rows < tl.where(left <= 0, G * T, 0))[:, None], other=0.0)
    qp = tl.load(QPOS + t, mask=row_ok, other=-1)
    first = tl.min(tl.where(row_ok, qp, 2**62), 0)
    last = tl.max(qp, 0)
    base = b * skb + h * skh
    if chunk < chunks:  # bounds
        best_u = tl.full([], float("-inf"), tl.float32)
        best = tl.full([], -1, tl.int32)
        seen = tl.zeros([], tl.int32)
        for it in range(0, tl.where((left <= 0) | (head == 0), ITERS, 0)):
            blk = (chunk * ITERS + it) * BLOCK_B + tl.arange(0, BLOCK_B)
            visible, always = _roles(COUNT, PMIN, PMAX, blk, NB, first, last, window, sink, recent, HAS_WINDOW)
            seen += tl.sum(visible.to(tl.int32), 0)
            if left <= 0:
                at = b * smb + h * smh + blk.to(tl.int64)[:, None] * smn + d[None, :]
                # loaded with the block figures, not after them; an empty block's +-inf must not reach the product
                lo = tl.where(visible[:, None], tl.load(KMIN + at, mask=(blk < NB)[:, None], other=0.0), 0.0)
                hi = tl.where(visible[:, None], tl.load(KMAX + at, mask=(blk < NB)[:, None], other=0.0), 0.0)
                if IEEE:
                    u = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
                    u += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
                else:  # bf16/fp16 operands: every product is exact in the fp32 accumulator, as in the attention kernel's scores
                    u = tl.dot(tl.maximum(q, 0.0).to(hi.dtype), tl.trans(hi))
                    u += tl.dot(tl.minimum(q, 0.0).to(lo.dtype), tl.trans(lo))
                u = tl.where(visible[None, :], u * scale, float("-inf"))
                u = tl.where(always[None, :], float("inf"), u)
                tl.store(U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut + blk[None, :], u, mask=row_ok[:, None] & (blk < NB)[None, :])
                # the block of highest bound among the visible ones not always read
                top = tl.where(always, float("-inf"), tl.max(tl.where(row_ok[:, None], u, float("-inf")), 0))
                better = tl.max(top, 0) > best_u
                best = tl.where(better, (chunk * ITERS + it) * BLOCK_B + tl.argmax(top, 0), best)
                best_u = tl.maximum(best_u, tl.max(top, 0))
        if head == 0:
            tl.store(VIS + chunk, seen)
        if left <= 0:
            at_chunk = head * chunks + chunk
            tl.store(BEST_U + at_chunk, best_u)
            tl.store(BEST_I + at_chunk, best)
            lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
            if best >= 0:
                lse = _row_lse(q, K, KVPOS, base, best, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE)
            tl.store(BEST_LSE + at_chunk * BLOCK_M + rows, lse)
    else:  # the exact log-sum-exp of the always-read blocks of rank a mod ALWAYS
        a = chunk - chunks
        lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
        before = tl.zeros([], tl.int32)
        lanes = tl.arange(0, SCAN)
        for s0 in range(0, tl.where(left <= 0, NB, 0), SCAN):
            visible, always = _roles(COUNT, PMIN, PMAX, s0 + lanes, NB, first, last, window, sink, recent, HAS_WINDOW)
            always = always.to(tl.int32)
            todo = tl.where((before + tl.cumsum(always, 0) - 1) % ALWAYS == a, always, 0)
            while tl.sum(todo, 0) > 0:  # (a step per block: most programs have one or none)
                i = tl.argmax(todo, 0)
                lse = _logaddexp(lse, _row_lse(q, K, KVPOS, base, s0 + i, skn, S, qp, row_ok, window, scale, BLOCK, D, HAS_WINDOW, IEEE))
                todo = tl.where(lanes == i, 0, todo)
            before += tl.sum(always, 0)
        if left <= 0:
            tl.store(PLSE + (head * ALWAYS + a) * BLOCK_M + rows, lse)


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
def _first_lse(PLSE, BEST_U, BEST_I, BEST_LSE, head, chunks, rows, BLOCK_M: tl.constexpr, ALWAYS: tl.constexpr, CB: tl.constexpr):
    """L per row, the log-sum-exp of the always-read blocks and of the head's other block of highest bound; and that
    block (-1: none): reduced from `_bounds`' figures, with no load waiting on another."""
    part = tl.load(PLSE + (head * ALWAYS + tl.arange(0, ALWAYS))[:, None] * BLOCK_M + rows[None, :])
    m = tl.max(part, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    L = tl.where(m == float("-inf"), m, m_safe + tl.log(tl.sum(tl.exp(part - m_safe[None, :]), 0)))
    best_u = tl.full([], float("-inf"), tl.float32)
    best = tl.full([], -1, tl.int32)
    best_lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        ok = c < chunks
        top = tl.load(BEST_U + head * chunks + c, mask=ok, other=float("-inf"))
        idx = tl.load(BEST_I + head * chunks + c, mask=ok, other=-1)
        lses = tl.load(BEST_LSE + (head * chunks + c)[:, None] * BLOCK_M + rows[None, :], mask=ok[:, None], other=float("-inf"))
        i = tl.argmax(top, 0)
        better = tl.max(top, 0) > best_u
        best = tl.where(better, tl.sum(tl.where(c == c0 + i, idx, 0), 0), best)
        best_lse = tl.where(better, tl.max(tl.where((c == c0 + i)[:, None], lses, float("-inf")), 0), best_lse)
        best_u = tl.maximum(best_u, tl.max(top, 0))
    return _logaddexp(L, best_lse), best


@triton.jit
def _weigh(
    U, COUNT, LEFT, PLSE, BEST_U, BEST_I, BEST_LSE, VIS, LOUT, VISIBLE, DENSE, EB, HSUM, HCNT, sub, suh, sut, Hkv, T, NB,
    chunks, low, G: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
    HB: tl.constexpr, CB: tl.constexpr, ALWAYS: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): L (every program of the head computes it; the first stores it), then
    each block's weight bin, and the chunk's sum and count of weights per bin. The first also copies whether the
    head reads every block this step (DENSE), for the kernels after `_cut`, which updates LEFT."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    dense = tl.load(LEFT + head) > 0
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    start = chunk * CHUNK
    stop = tl.minimum(start + CHUNK, NB)
    u_rows = U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut
    # the first step's bounds are loaded with `_bounds`' figures, not after L is known
    blk = start + tl.arange(0, STEP)
    live = tl.where(dense, start, stop)  # (a head reading every block needs no weights)
    ahead = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & (blk < live)[None, :], other=float("-inf"))
    count_ahead = tl.load(COUNT + blk, mask=blk < live, other=0)
    L = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best = tl.full([], -1, tl.int32)
    if live > start:
        L, best = _first_lse(PLSE, BEST_U, BEST_I, BEST_LSE, head, chunks, rows, BLOCK_M, ALWAYS, CB)
    if chunk == 0:
        visible = tl.zeros([], tl.int32)
        for c0 in range(0, chunks, CB):
            c = c0 + tl.arange(0, CB)
            visible += tl.sum(tl.load(VIS + c, mask=c < chunks, other=0), 0)
        tl.store(LOUT + head * BLOCK_M + rows, L)
        tl.store(VISIBLE + head, visible)
        tl.store(DENSE + head, dense.to(tl.int32))
    bins = tl.arange(0, HB)
    sums = tl.zeros([HB], tl.float32)
    counts = tl.zeros([HB], tl.int32)
    for c0 in range(start, live, STEP):
        blk = c0 + tl.arange(0, STEP)
        ok = blk < stop
        if c0 == start:
            u, count = ahead, count_ahead
        else:
            u = tl.load(u_rows + blk[None, :], mask=row_ok[:, None] & ok[None, :], other=float("-inf"))
            count = tl.load(COUNT + blk, mask=ok, other=0)
        w = _weights(u, count, L, row_ok)
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
    EB, HSUM, HCNT, DENSE, VISIBLE, LEFT, TILES, NREAD, READ, UNREAD, NB, chunks, eps,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
    NUM: tl.constexpr, DEN: tl.constexpr, PROBE: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): the head's cut from all chunks' sums (the largest power of two whose
    weights below sum to <= eps), then this chunk's blocks at or above it written to the head's list in key order.
    The first program also writes the head's blocks read (READ), and its units for the Lean walk (NREAD: every
    block's, for a head that reads them all), and counts LEFT down (`attention.hsr.next_dense_left`)."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    if tl.load(DENSE + head) > 0:
        if chunk == 0:
            tl.store(NREAD + head, NB)
            tl.store(READ + head, tl.load(VISIBLE + head))
            tl.store(UNREAD + head, 0.0)
            left = tl.load(LEFT + head)
            tl.store(LEFT + head, tl.where(left > 1, left - 1, -1))
        return
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
        tl.store(READ + head, total)
        tl.store(UNREAD + head, unread)
        visible = tl.load(VISIBLE + head)
        spread = (total * DEN >= visible * NUM) & (visible > 0)
        tl.store(LEFT + head, tl.where(spread, tl.where(tl.load(LEFT + head) < 0, PROBE - 1, -1), 0))
    end = tl.minimum(chunk * CHUNK + CHUNK, NB)
    for c0 in range(chunk * CHUNK, end, BLOCK_B):
        blk = c0 + tl.arange(0, BLOCK_B)
        read = (tl.load(EB + head.to(tl.int64) * NB + blk, mask=blk < end, other=0).to(tl.int32) >= cut) & (blk < end)
        at = offset + tl.cumsum(read.to(tl.int32), 0) - 1
        tl.store(TILES + head.to(tl.int64) * NB + at, blk, mask=read)
        offset += tl.sum(read.to(tl.int32), 0)


def hsr_attend(q: Tensor, k: Tensor, v: Tensor, mask, summary, eps: float, sink: int, recent: int, bins: int, low: int):
    """`attention.hsr.hsr_attend` on CUDA: (out, lse, certificate, blocks read [B, Hkv], blocks visible)."""
    B, Hq, T, D = q.shape
    Hkv, S, nb, block = k.shape[1], k.shape[2], summary.count.numel(), summary.block
    G = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    BLOCK_M = max(16, triton.next_power_of_2(G * T))
    dev = q.device
    iters = 1  # BLOCK_B steps per program of `_bounds`: each also reads its best block's keys, which few programs share
    while iters < 8 and B * Hkv * triton.cdiv(nb, BLOCK_B * iters) > BOUNDS_PROGRAMS:
        iters *= 2
    chunks = triton.cdiv(nb, BLOCK_B * iters)
    u = torch.empty(B, Hq, T, nb, dtype=torch.float32, device=dev)
    plse = torch.empty(B * Hkv, ALWAYS, BLOCK_M, dtype=torch.float32, device=dev)
    best_u = torch.empty(B * Hkv, chunks, dtype=torch.float32, device=dev)
    best_i = torch.empty(B * Hkv, chunks, dtype=torch.int32, device=dev)
    best_lse = torch.empty(B * Hkv, chunks, BLOCK_M, dtype=torch.float32, device=dev)
    vis = torch.empty(chunks, dtype=torch.int32, device=dev)
    kmin, kmax = summary.kmin, summary.kmax
    left = summary.dense_left
    _bounds[(B * Hkv, chunks + ALWAYS)](
        q, k, kmin, kmax, summary.count, summary.pmin, summary.pmax, mask.q_pos, mask.kv_pos, left, u, plse, best_u, best_i,
        best_lse, vis, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), kmin.stride(0),
        kmin.stride(1), kmin.stride(2), u.stride(0), u.stride(1), u.stride(2), Hkv, T, S, nb, chunks, mask.window or 0,
        sink, recent, 1 / math.sqrt(D), G=G, BLOCK_M=BLOCK_M, BLOCK_B=BLOCK_B, ITERS=iters, BLOCK=block, D=D,
        ALWAYS=ALWAYS, SCAN=min(SCAN, triton.next_power_of_2(nb)), HAS_WINDOW=mask.window is not None,
        IEEE=q.dtype.itemsize == 4, num_stages=1,  # (ITERS is small: no shared memory for a pipeline of summaries)
    )  # fmt: skip
    L = torch.empty(B * Hkv, BLOCK_M, dtype=torch.float32, device=dev)
    visible = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    chunk = max(CHUNK, triton.next_power_of_2(triton.cdiv(nb, MAX_CHUNKS)))
    wide = triton.cdiv(nb, chunk)
    hb = triton.next_power_of_2(bins + 2)
    eb = torch.empty(B * Hkv, nb, dtype=torch.int8, device=dev)
    hsum = torch.empty(B * Hkv, wide, hb, dtype=torch.float32, device=dev)
    hcnt = torch.empty(B * Hkv, wide, hb, dtype=torch.int32, device=dev)
    dense = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    _weigh[(B * Hkv, wide)](
        u, summary.count, left, plse, best_u, best_i, best_lse, vis, L, visible, dense, eb, hsum, hcnt, u.stride(0), u.stride(1),
        u.stride(2), Hkv, T, nb, chunks, low, G=G, BLOCK_M=BLOCK_M, STEP=min(chunk, CHUNK), CHUNK=chunk, BINS=bins, HB=hb,
        CB=64, ALWAYS=ALWAYS,
    )  # fmt: skip
    tiles = torch.empty(B * Hkv, nb, dtype=torch.int32, device=dev)
    units, read = (torch.empty(B * Hkv, dtype=torch.int32, device=dev) for _ in range(2))
    unread = torch.empty(B * Hkv, dtype=torch.float32, device=dev)
    _cut[(B * Hkv, wide)](
        eb, hsum, hcnt, dense, visible, left, tiles, units, read, unread, nb, wide, eps, BLOCK_B=BLOCK_B, CHUNK=chunk,
        BINS=bins, HB=hb, CB=64, NUM=DENSE_SHARE[0], DEN=DENSE_SHARE[1], PROBE=PROBE_EVERY,
    )  # fmt: skip
    out, lse, certificate = lean.lean_sparse_attend(q, k, v, mask, tiles, units, block, dense=dense, certify=(L, unread))
    return out, lse, certificate, read.view(B, Hkv), visible[0]
