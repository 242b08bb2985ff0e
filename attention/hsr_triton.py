"""The Triton kernels of HSR sparse decode (attention/hsr.py has the rule; this is the same rule on CUDA).

A step is three launches for a cache of up to SELECT_ALONE blocks per head and five beyond, with nothing decided
on the host, every kernel spread over the blocks of each head as well as over heads. Each kernel's own latency is
what a step at a small share costs, so none waits on a chain of dependent loads where it can be avoided:
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

For few blocks a launch costs more than the work of 2 and 3, so `_select` does 1-3 in one: `_bounds`' programs,
then the last of a head's programs to finish (an atomic count, which orders the others' writes before its reads)
weighs, cuts and lists all of the head's blocks alone. A head in its run of steps that read every block costs it
one program's count of visible blocks: a step of such heads is then three launches to dense Lean's two. That run's
state holds the position where it ends (`attention.hsr.next_dense_until`), so that only a selection writes it,
after every program of the head has read it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from longctx.attention.lean_triton import masked_scores, widen
from longctx.attention.settings import Setting

BLOCK_B = 64  # blocks per step of every kernel's loop over blocks
ALWAYS = 8  # programs per head that read the always-read blocks in `_bounds`
SCAN = 1024  # blocks those programs look at per step, to find theirs
BOUNDS_PROGRAMS = 128  # `_bounds` programs per launch at most (up to 8 x BLOCK_B blocks each), beyond ALWAYS
CHUNK = 128  # blocks per program of `_weigh` and `_cut` at least; more where a head has over MAX_CHUNKS of them
MAX_CHUNKS = 64  # (each of those programs reads every chunk's figures: more chunks cost more than they spread)
# blocks per head up to which one launch selects (`_select`), its last program per head alone (a check of both launch
# plans changes it for a scope: `with SELECT_ALONE.scoped(0): ...`)
SELECT_ALONE: Setting[int] = Setting("select_alone", 512)


@triton.jit
def _row_lse(q, K, KVPOS, base, blk, skn, S, qp, row_ok, window, scale, KS, sbase, sss,
             BLOCK: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
             SCALED: tl.constexpr):  # fmt: skip
    """Exact log-sum-exp per query row of the visible keys of block `blk` (-inf where none). SCALED: the keys are
    FP8 or int8 codes with a scale per slot (its int8 exponent at KS + sbase + n * sss), as the Lean kernel reads
    them."""
    n = blk * BLOCK + tl.arange(0, BLOCK)
    kp = tl.load(KVPOS + n, mask=n < S, other=-1)
    k = tl.load(K + base + n.to(tl.int64)[:, None] * skn + tl.arange(0, D)[None, :], mask=(n < S)[:, None], other=0.0)
    if SCALED:
        k = widen(k, q.dtype)
    s = masked_scores(q, k, kp, qp, row_ok, window, scale, HAS_WINDOW, IEEE)
    if SCALED:
        s = s * tl.exp2(tl.load(KS + sbase + n.to(tl.int64) * sss, mask=n < S, other=0).to(tl.float32))[None, :]
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
def _query_span(QPOS, T, BLOCK_M: tl.constexpr):
    """(first, last) position of the step's query tokens."""
    t = tl.arange(0, BLOCK_M)
    qp = tl.load(QPOS + t, mask=t < T, other=-1)
    return tl.min(tl.where(t < T, qp, 2**62), 0), tl.max(qp, 0)


@triton.jit
def _reads_everything(UNTIL, QPOS, head, T, BLOCK_M: tl.constexpr):
    """1 where the head is in its run of steps that read every block (`attention.hsr.reads_everything`), else 0."""
    _, last = _query_span(QPOS, T, BLOCK_M)
    return (tl.load(UNTIL + head) > last).to(tl.int32)


@triton.jit
def _bounds_part(
    Q, K, KS, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, U, PLSE, BEST_U, BEST_I, BEST_LSE, head, chunk, dense,
    sqb, sqh, sqt, skb, skh, skn, ssb, ssh, sss, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, chunks, window, sink,
    recent, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, ALWAYS: tl.constexpr, SCAN: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    SCALED: tl.constexpr,
):  # fmt: skip
    """One program of `_bounds`: chunk < chunks takes blocks of chunk, the others an ALWAYS share. Returns the
    chunk's visible blocks, counted whether or not the head reads every block this step (dense, 0 or 1); a head
    that does computes nothing else."""
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :],
        mask=(rows < tl.where(dense > 0, 0, G * T))[:, None],
        other=0.0,
    )
    qp = tl.load(QPOS + t, mask=row_ok, other=-1)
    first = tl.min(tl.where(row_ok, qp, 2**62), 0)
    last = tl.max(qp, 0)
    base = b * skb + h * skh
    sbase = b * ssb + h * ssh
    seen = tl.zeros([], tl.int32)
    if chunk < chunks:  # bounds
        best_u = tl.full([], float("-inf"), tl.float32)
        best = tl.full([], -1, tl.int32)
        for it in range(0, ITERS):
            blk = (chunk * ITERS + it) * BLOCK_B + tl.arange(0, BLOCK_B)
            visible, always = _roles(COUNT, PMIN, PMAX, blk, NB, first, last, window, sink, recent, HAS_WINDOW)
            seen += tl.sum(visible.to(tl.int32), 0)
            if dense == 0:
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
                tl.store(
                    U + b * sub + (h * G + j)[:, None] * suh + t[:, None] * sut + blk[None, :],
                    u,
                    mask=row_ok[:, None] & (blk < NB)[None, :],
                )
                # the block of highest bound among the visible ones not always read
                top = tl.where(always, float("-inf"), tl.max(tl.where(row_ok[:, None], u, float("-inf")), 0))
                better = tl.max(top, 0) > best_u
                best = tl.where(better, (chunk * ITERS + it) * BLOCK_B + tl.argmax(top, 0), best)
                best_u = tl.maximum(best_u, tl.max(top, 0))
        if dense == 0:
            at_chunk = head * chunks + chunk
            tl.store(BEST_U + at_chunk, best_u)
            tl.store(BEST_I + at_chunk, best)
            lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
            if best >= 0:
                lse = _row_lse(q, K, KVPOS, base, best, skn, S, qp, row_ok, window, scale, KS, sbase, sss, BLOCK, D,
                               HAS_WINDOW, IEEE, SCALED)  # fmt: skip
            tl.store(BEST_LSE + at_chunk * BLOCK_M + rows, lse)
    else:  # the exact log-sum-exp of the always-read blocks of rank a mod ALWAYS
        a = chunk - chunks
        lse = tl.full([BLOCK_M], float("-inf"), tl.float32)
        before = tl.zeros([], tl.int32)
        lanes = tl.arange(0, SCAN)
        for s0 in range(0, tl.where(dense > 0, 0, NB), SCAN):
            visible, always = _roles(COUNT, PMIN, PMAX, s0 + lanes, NB, first, last, window, sink, recent, HAS_WINDOW)
            always = always.to(tl.int32)
            todo = tl.where((before + tl.cumsum(always, 0) - 1) % ALWAYS == a, always, 0)
            while tl.sum(todo, 0) > 0:  # (a step per block: most programs have one or none)
                i = tl.argmax(todo, 0)
                lse = _logaddexp(
                    lse,
                    _row_lse(
                        q,
                        K,
                        KVPOS,
                        base,
                        s0 + i,
                        skn,
                        S,
                        qp,
                        row_ok,
                        window,
                        scale,
                        KS,
                        sbase,
                        sss,
                        BLOCK,
                        D,
                        HAS_WINDOW,
                        IEEE,
                        SCALED,
                    ),  # fmt: skip
                )
                todo = tl.where(lanes == i, 0, todo)
            before += tl.sum(always, 0)
        if dense == 0:
            tl.store(PLSE + (head * ALWAYS + a) * BLOCK_M + rows, lse)
    return seen


@triton.jit
def _bounds(
    Q, K, KS, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, UNTIL, U, PLSE, BEST_U, BEST_I, BEST_LSE, VIS,
    sqb, sqh, sqt, skb, skh, skn, ssb, ssh, sss, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, chunks, window, sink,
    recent, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, ALWAYS: tl.constexpr, SCAN: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    SCALED: tl.constexpr,
):  # fmt: skip
    """`_bounds_part`, and the chunk's visible blocks (VIS [heads, chunks]): the same for every head (positions
    are), counted by each (a head may finish before another starts)."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    seen = _bounds_part(
        Q, K, KS, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, U, PLSE, BEST_U, BEST_I, BEST_LSE, head, chunk,
        _reads_everything(UNTIL, QPOS, head, T, BLOCK_M), sqb, sqh, sqt, skb, skh, skn, ssb, ssh, sss, smb, smh, smn,
        sub, suh, sut, Hkv, T, S, NB, chunks, window, sink, recent, scale, G, BLOCK_M, BLOCK_B, ITERS, BLOCK, D, ALWAYS,
        SCAN, HAS_WINDOW, IEEE, SCALED,
    )  # fmt: skip
    if chunk < chunks:
        tl.store(VIS + head * chunks + chunk, seen)


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
def _first_lse(
    PLSE, BEST_U, BEST_I, BEST_LSE, head, chunks, rows, BLOCK_M: tl.constexpr, ALWAYS: tl.constexpr, CB: tl.constexpr
):
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
        lses = tl.load(
            BEST_LSE + (head * chunks + c)[:, None] * BLOCK_M + rows[None, :], mask=ok[:, None], other=float("-inf")
        )
        i = tl.argmax(top, 0)
        better = tl.max(top, 0) > best_u
        best = tl.where(better, tl.sum(tl.where(c == c0 + i, idx, 0), 0), best)
        best_lse = tl.where(better, tl.max(tl.where((c == c0 + i)[:, None], lses, float("-inf")), 0), best_lse)
        best_u = tl.maximum(best_u, tl.max(top, 0))
    return _logaddexp(L, best_lse), best


@triton.jit
def _weigh_part(
    U, COUNT, PLSE, BEST_U, BEST_I, BEST_LSE, EB, head, dense, start, stop, sub, suh, sut, Hkv, T, NB, chunks, low,
    G: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr,
    CB: tl.constexpr, ALWAYS: tl.constexpr,
):  # fmt: skip
    """The weights of blocks [start, stop) of a head: each block's bin (EB); returns (sum, count) of the weights per
    bin, and L (`_first_lse`). A head that reads every block this step (dense) needs no weights: 0, 0, -inf."""
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j, t = rows // T, rows % T
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
    return sums, counts, L


@triton.jit
def _weigh(
    U, COUNT, UNTIL, QPOS, PLSE, BEST_U, BEST_I, BEST_LSE, VIS, LOUT, VISIBLE, DENSE, EB, HSUM, HCNT, sub, suh, sut, Hkv, T, NB,
    chunks, low, G: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
    HB: tl.constexpr, CB: tl.constexpr, ALWAYS: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): `_weigh_part` of the chunk, its sums and counts stored for `_cut`
    (which updates UNTIL). The first program also stores L, the head's visible blocks (from VIS) and whether it reads
    every block this step (DENSE), for the kernels after."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    dense = _reads_everything(UNTIL, QPOS, head, T, BLOCK_M) > 0
    sums, counts, L = _weigh_part(
        U, COUNT, PLSE, BEST_U, BEST_I, BEST_LSE, EB, head, dense, start, tl.minimum(start + CHUNK, NB), sub, suh, sut,
        Hkv, T, NB, chunks, low, G, BLOCK_M, STEP, BINS, HB, CB, ALWAYS,
    )  # fmt: skip
    if chunk == 0:
        visible = tl.zeros([], tl.int32)
        for c0 in range(0, chunks, CB):
            c = c0 + tl.arange(0, CB)
            visible += tl.sum(tl.load(VIS + head * chunks + c, mask=c < chunks, other=0), 0)
        tl.store(LOUT + head * BLOCK_M + tl.arange(0, BLOCK_M), L)
        tl.store(VISIBLE + head, visible)
        tl.store(DENSE + head, dense.to(tl.int32))
    at = (head * tl.num_programs(1) + chunk) * HB + tl.arange(0, HB)
    tl.store(HSUM + at, sums)
    tl.store(HCNT + at, counts)


@triton.jit
def _cut_of(sums, eps, BINS: tl.constexpr, HB: tl.constexpr):
    """(cut, unread): the largest bin whose weights below sum to <= eps, and that sum."""
    bins = tl.arange(0, HB)
    # below[k]: the weights in bins < k (bin 0: under 2^low), for k = 1 .. BINS + 1 (skipping bins below k)
    below = tl.sum(tl.where(bins[None, :] < bins[:, None], sums[None, :], 0.0), 1)
    cut = tl.max(tl.where((below <= eps) & (bins >= 1) & (bins <= BINS + 1), bins, 1), 0)  # below[1] <= eps / 2
    return cut, tl.sum(tl.where(bins == cut, below, 0.0), 0)


@triton.jit
def _finish(NREAD, READ, UNREAD, UNTIL, STATS, head, dense, read, unread, visible, state, last, T, NB,
            NUM: tl.constexpr, DEN: tl.constexpr, PROBE: tl.constexpr, HAS_STATS: tl.constexpr):  # fmt: skip
    """A head's blocks read (READ), units for the Lean walk (NREAD: every block's where it reads them all, the list
    unread), unread weight, and after a selection its next state (`attention.hsr.next_dense_until`; the state of
    a head in its run stays). HAS_STATS: also adds its blocks read and visible to STATS[0] and STATS[1]."""
    if HAS_STATS:
        tl.atomic_add(STATS, tl.where(dense, visible, read).to(tl.float64))
        tl.atomic_add(STATS + 1, visible.to(tl.float64))
    tl.store(NREAD + head, tl.where(dense, NB, read))
    tl.store(READ + head, tl.where(dense, visible, read))
    tl.store(UNREAD + head, tl.where(dense, 0.0, unread))
    if not dense:
        spread = (read * DEN >= visible * NUM) & (visible > 0)
        tl.store(UNTIL + head, tl.where(spread, tl.where(state != 0, last + PROBE * T, -1), 0).to(tl.int32))


@triton.jit
def _write_list(EB, TILES, head, start, end, offset, cut, NB, BLOCK_B: tl.constexpr):
    """Blocks [start, end) of the head whose bin is at or above the cut, to its list from `offset` on, in order."""
    offset += tl.zeros([], tl.int32)  # (a tensor, as the loop carries it)
    for c0 in range(start, end, BLOCK_B):
        blk = c0 + tl.arange(0, BLOCK_B)
        read = (tl.load(EB + head.to(tl.int64) * NB + blk, mask=blk < end, other=0).to(tl.int32) >= cut) & (blk < end)
        at = offset + tl.cumsum(read.to(tl.int32), 0) - 1
        tl.store(TILES + head.to(tl.int64) * NB + at, blk, mask=read)
        offset += tl.sum(read.to(tl.int32), 0)


@triton.jit
def _cut(
    EB, HSUM, HCNT, DENSE, VISIBLE, UNTIL, QPOS, TILES, NREAD, READ, UNREAD, STATS, T, NB, chunks, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
    NUM: tl.constexpr, DEN: tl.constexpr, PROBE: tl.constexpr, HAS_STATS: tl.constexpr,
):  # fmt: skip
    """Per (batch x KV head, CHUNK blocks): the head's cut from all chunks' sums, then this chunk's blocks at or
    above it written to the head's list after those of the chunks before it. The first program `_finish`es the head."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    dense = tl.load(DENSE + head) > 0
    if dense:
        if chunk == 0:
            _finish(
                NREAD,
                READ,
                UNREAD,
                UNTIL,
                STATS,
                head,
                True,
                0,
                0.0,
                tl.load(VISIBLE + head),
                0,
                0,
                T,
                NB,
                NUM,
                DEN,
                PROBE,
                HAS_STATS,
            )
        return
    bins = tl.arange(0, HB)
    sums = tl.zeros([HB], tl.float32)
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        sums += tl.sum(
            tl.load(HSUM + (head * chunks + c)[:, None] * HB + bins[None, :], mask=(c < chunks)[:, None], other=0.0), 0
        )
    cut, unread = _cut_of(sums, eps, BINS, HB)
    offset = 0
    total = 0
    for c0 in range(0, chunks, CB):
        c = c0 + tl.arange(0, CB)
        n = tl.sum(
            tl.load(
                HCNT + (head * chunks + c)[:, None] * HB + bins[None, :],
                mask=(c < chunks)[:, None] & (bins >= cut)[None, :],
                other=0,
            ),
            1,
        )
        offset += tl.sum(tl.where(c < chunk, n, 0), 0)
        total += tl.sum(n, 0)
    if chunk == 0:
        _, last = _query_span(QPOS, T, BLOCK_M)
        _finish(NREAD, READ, UNREAD, UNTIL, STATS, head, False, total, unread, tl.load(VISIBLE + head), tl.load(UNTIL + head),
                last, T, NB, NUM, DEN, PROBE, HAS_STATS)  # fmt: skip
    _write_list(EB, TILES, head, chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, NB), offset, cut, NB, BLOCK_B)


@triton.jit
def _count_visible(COUNT, PMIN, PMAX, QPOS, T, NB, window, sink, recent, BLOCK_M: tl.constexpr, SCAN: tl.constexpr,
                   HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Blocks any query token can see, counted SCAN at a time."""
    first, last = _query_span(QPOS, T, BLOCK_M)
    visible = tl.zeros([], tl.int32)
    for s0 in range(0, NB, SCAN):
        seen, _ = _roles(COUNT, PMIN, PMAX, s0 + tl.arange(0, SCAN), NB, first, last, window, sink, recent, HAS_WINDOW)
        visible += tl.sum(seen.to(tl.int32), 0)
    return visible


@triton.jit
def _select(
    Q, K, KS, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, UNTIL, ARRIVED, U, PLSE, BEST_U, BEST_I, BEST_LSE, LOUT,
    VISIBLE, DENSE, EB, TILES, NREAD, READ, UNREAD, STATS,
    sqb, sqh, sqt, skb, skh, skn, ssb, ssh, sss, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, chunks, window, sink,
    recent, scale, low, eps,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, ALWAYS: tl.constexpr, SCAN: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    SCALED: tl.constexpr, STEP: tl.constexpr, BINS: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
    NUM: tl.constexpr, DEN: tl.constexpr, PROBE: tl.constexpr, HAS_STATS: tl.constexpr,
):  # fmt: skip
    """The whole selection in one launch, for caches of few blocks. A head's first program counts its visible blocks
    (and alone finishes a head that reads every block this step); then `_bounds`' programs, the last of which to
    finish (counted in ARRIVED, back to 0 after: its atomic acquires the others' writes) weighs, cuts and lists all
    the head's blocks alone."""
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    state = tl.load(UNTIL + head)
    _, last = _query_span(QPOS, T, BLOCK_M)
    dense = (state > last).to(tl.int32)
    if chunk == 0:  # (its loads do not wait on UNTIL's)
        visible = _count_visible(COUNT, PMIN, PMAX, QPOS, T, NB, window, sink, recent, BLOCK_M, SCAN, HAS_WINDOW)
        tl.store(VISIBLE + head, visible)
        if dense > 0:
            tl.store(DENSE + head, 1)
            _finish(
                NREAD,
                READ,
                UNREAD,
                UNTIL,
                STATS,
                head,
                True,
                0,
                0.0,
                visible,
                state,
                last,
                T,
                NB,
                NUM,
                DEN,
                PROBE,
                HAS_STATS,
            )
    if dense == 0:
        _bounds_part(
            Q, K, KS, KMIN, KMAX, COUNT, PMIN, PMAX, QPOS, KVPOS, U, PLSE, BEST_U, BEST_I, BEST_LSE, head, chunk, dense,
            sqb, sqh, sqt, skb, skh, skn, ssb, ssh, sss, smb, smh, smn, sub, suh, sut, Hkv, T, S, NB, chunks, window,
            sink, recent, scale, G, BLOCK_M, BLOCK_B, ITERS, BLOCK, D, ALWAYS, SCAN, HAS_WINDOW, IEEE, SCALED,
        )  # fmt: skip
        tl.debug_barrier()  # every thread's stores before the count (a release: the last program acquires them)
        if tl.atomic_add(ARRIVED + head, 1, sem="acq_rel") == chunks + ALWAYS - 1:
            tl.store(ARRIVED + head, 0)
            visible = tl.load(VISIBLE + head)
            sums, counts, L = _weigh_part(
                U, COUNT, PLSE, BEST_U, BEST_I, BEST_LSE, EB, head, False, 0, NB, sub, suh, sut, Hkv, T, NB, chunks, low,
                G, BLOCK_M, STEP, BINS, HB, CB, ALWAYS,
            )  # fmt: skip
            tl.store(LOUT + head * BLOCK_M + tl.arange(0, BLOCK_M), L)
            tl.store(DENSE + head, 0)
            cut, unread = _cut_of(sums, eps, BINS, HB)
            read = tl.sum(tl.where(tl.arange(0, HB) >= cut, counts, 0), 0)
            _finish(
                NREAD,
                READ,
                UNREAD,
                UNTIL,
                STATS,
                head,
                False,
                read,
                unread,
                visible,
                state,
                last,
                T,
                NB,
                NUM,
                DEN,
                PROBE,
                HAS_STATS,
            )
            tl.debug_barrier()  # (EB, written by all of this program's threads)
            _write_list(EB, TILES, head, 0, NB, 0, cut, NB, SCAN)


@triton.jit
def _update_summary(
    K, SLOTS, POS, KMIN, KMAX, COUNT, PMIN, PMAX, n, Hkv, skb, skh, skn, smb, smh, smn,
    BLOCK: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """One program per (batch, KV head): its keys folded into their blocks' minimum and maximum, one after another
    (several may share a block); the first program also counts them and keeps the blocks' positions."""
    head = tl.program_id(0)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    d = tl.arange(0, D)
    for i in range(0, n):
        blk = tl.load(SLOTS + i) // BLOCK
        key = tl.load(K + b * skb + h * skh + i * skn + d).to(KMIN.dtype.element_ty)
        at = b * smb + h * smh + blk * smn + d
        tl.store(KMIN + at, tl.minimum(tl.load(KMIN + at), key))
        tl.store(KMAX + at, tl.maximum(tl.load(KMAX + at), key))
        if head == 0:
            pos = tl.load(POS + i)
            tl.store(COUNT + blk, tl.load(COUNT + blk) + 1)
            tl.store(PMIN + blk, tl.minimum(tl.load(PMIN + blk), pos))
            tl.store(PMAX + blk, tl.maximum(tl.load(PMAX + blk), pos))
        tl.debug_barrier()  # (the next key may fall in the same block: its loads after these stores)


def update_summary(summary, slots: Tensor, k: Tensor, positions: Tensor) -> None:
    """`attention.hsr.KeySummary.update` in one launch, for a few keys k [B, Hkv, n, D] at `slots` [n]."""
    B, Hkv, n, D = k.shape
    kmin = summary.kmin
    _update_summary[(B * Hkv,)](
        k, slots, positions, kmin, summary.kmax, summary.count, summary.pmin, summary.pmax, n, Hkv, k.stride(0),
        k.stride(1), k.stride(2), kmin.stride(0), kmin.stride(1), kmin.stride(2), BLOCK=summary.block, D=D,
    )  # fmt: skip


def select(q: Tensor, k: Tensor, mask, summary, eps: float, sink: int, recent: int, bins: int, low: int,
           rule: tuple[int, int, int], programs: int, stats: Tensor | None = None, scales=None):  # fmt: skip
    """The selection of `attention.hsr.hsr_attend` on CUDA, for its final read (`lean.lean_sparse_attend`): per
    (batch, KV head) the tiles to read and their count, whether it reads every block, the first read's lse per row and
    the unread weight; then the blocks read [B * Hkv] and the blocks visible [B * Hkv]. `rule` is the dense-run rule
    (DENSE_SHARE's two parts, PROBE_EVERY), `programs` the SMs' programs a wave holds; `stats` as there, counted by
    the kernels (their atomics: no launch of its own); `scales`: the exponents of k's scales where it is stored in
    one byte."""
    B, Hq, T, D = q.shape
    Hkv, S, nb, block = k.shape[1], k.shape[2], summary.count.numel(), summary.block
    G, heads = Hq // Hkv, B * Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    BLOCK_M = max(16, triton.next_power_of_2(G * T))
    dev = q.device
    iters = 1  # BLOCK_B steps per program of `_bounds`: each also reads its best block's keys, which few programs share
    while iters < 8 and heads * triton.cdiv(nb, BLOCK_B * iters) > BOUNDS_PROGRAMS:
        iters *= 2
    chunks = triton.cdiv(nb, BLOCK_B * iters)
    u = torch.empty(B, Hq, T, nb, dtype=torch.float32, device=dev)
    plse = torch.empty(heads, ALWAYS, BLOCK_M, dtype=torch.float32, device=dev)
    best_u = torch.empty(heads, chunks, dtype=torch.float32, device=dev)
    best_i = torch.empty(heads, chunks, dtype=torch.int32, device=dev)
    best_lse = torch.empty(heads, chunks, BLOCK_M, dtype=torch.float32, device=dev)
    L = torch.empty(heads, BLOCK_M, dtype=torch.float32, device=dev)
    visible, dense, units, read = (torch.empty(heads, dtype=torch.int32, device=dev) for _ in range(4))
    unread = torch.empty(heads, dtype=torch.float32, device=dev)
    eb = torch.empty(heads, nb, dtype=torch.int8, device=dev)
    tiles = torch.empty(heads, nb, dtype=torch.int32, device=dev)
    kmin, kmax, until = summary.kmin, summary.kmax, summary.dense_until
    hb = triton.next_power_of_2(bins + 2)
    ks = scales[0] if scales is not None else until  # (an unused pointer at full width)
    cached = (q, k, ks, kmin, kmax, summary.count, summary.pmin, summary.pmax, mask.q_pos, mask.kv_pos, until)
    key_scales = (ks.stride(0), ks.stride(1), ks.stride(2)) if scales is not None else (0, 0, 0)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *key_scales,
               kmin.stride(0), kmin.stride(1), kmin.stride(2), u.stride(0), u.stride(1), u.stride(2), Hkv, T, S, nb,
               chunks, mask.window or 0, sink, recent, 1 / math.sqrt(D))  # fmt: skip
    shape = dict(
        G=G,
        BLOCK_M=BLOCK_M,
        BLOCK_B=BLOCK_B,
        ITERS=iters,
        BLOCK=block,
        D=D,
        ALWAYS=ALWAYS,
        SCAN=min(SCAN, triton.next_power_of_2(nb)),
        HAS_WINDOW=mask.window is not None,
        IEEE=q.dtype.itemsize == 4,
        SCALED=scales is not None,
        num_stages=1,
    )  # (ITERS is small: no shared memory for a pipeline of summaries)
    rule = dict(BINS=bins, HB=hb, CB=64, NUM=rule[0], DEN=rule[1], PROBE=rule[2], HAS_STATS=stats is not None)
    counted = stats if stats is not None else unread  # (an unused pointer without stats)
    if nb <= SELECT_ALONE.get():
        # more threads where the launch is one wave: the heads' last programs then work alone, on latency
        one_wave = heads * (chunks + ALWAYS) <= programs
        _select[(heads, chunks + ALWAYS)](
            *cached, summary.arrived, u, plse, best_u, best_i, best_lse, L, visible, dense, eb, tiles, units, read, unread,
            counted, *strides, low, eps, STEP=min(triton.next_power_of_2(nb), 256), **shape, **rule, num_warps=8 if one_wave else 4,
        )  # fmt: skip
    else:
        vis = torch.empty(heads, chunks, dtype=torch.int32, device=dev)
        _bounds[(heads, chunks + ALWAYS)](*cached, u, plse, best_u, best_i, best_lse, vis, *strides, **shape)
        chunk = max(CHUNK, triton.next_power_of_2(triton.cdiv(nb, MAX_CHUNKS)))
        wide = triton.cdiv(nb, chunk)
        hsum = torch.empty(heads, wide, hb, dtype=torch.float32, device=dev)
        hcnt = torch.empty(heads, wide, hb, dtype=torch.int32, device=dev)
        _weigh[(heads, wide)](
            u, summary.count, until, mask.q_pos, plse, best_u, best_i, best_lse, vis, L, visible, dense, eb, hsum, hcnt, u.stride(0),
            u.stride(1), u.stride(2), Hkv, T, nb, chunks, low, G=G, BLOCK_M=BLOCK_M, STEP=min(chunk, CHUNK), CHUNK=chunk,
            BINS=bins, HB=hb, CB=64, ALWAYS=ALWAYS,
        )  # fmt: skip
        _cut[(heads, wide)](eb, hsum, hcnt, dense, visible, until, mask.q_pos, tiles, units, read, unread, counted, T, nb, wide, eps,
                            BLOCK_M=BLOCK_M, BLOCK_B=BLOCK_B, CHUNK=chunk, **rule)  # fmt: skip
    return tiles, units, dense, L, unread, read, visible
