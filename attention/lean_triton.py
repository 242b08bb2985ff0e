"""The Triton kernel of Lean Attention decode (attention/lean.py has the schedule and the closed forms it uses).

Each program walks its equal share of the (batch x KV head x key tile) units. For every head it touches it keeps
an online softmax over the tiles (running max, sum and weighted values, fp32) for all query rows of that KV head.
A head whose whole stretch lies in this program is written out; otherwise the program stores a partial (output,
lse) in its next slot. A second, small kernel then merges the partials of every split head with the rule of
`attention.merge.merge_partials`: one program per (head, query row), all of the head's partials loaded at once.

SPARSE: head h's units are the first COUNTS[h] tiles listed in LIST[h * tiles:], laid end to end in head order;
their number stays on the device. Every program sums COUNTS itself (a head's start and end, the total), so the
shares and the closed forms are those of the dense walk. Two things differ: there can be fewer units than
programs, so some shares are empty (the combine skips them), and each program records the head of its first unit
(HEAD0) for the combine to find its slots, since heads' lengths vary.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources  # noqa: F401  (lean.lean_attend catches it)

from attention import lean


@triton.jit
def masked_scores(q, k, kp, qp, row_ok, window, scale, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """Scaled scores of query rows q against keys k (positions kp), -inf where a row must not see a key."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    ok = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & row_ok[:, None]
    if HAS_WINDOW:
        ok = ok & (qp[:, None] - kp[None, :] < window)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _lean_decode(
    Q, K, V, QPOS, KVPOS, OUT, LSE, PO, PL, LIST, COUNTS, HEAD0,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, slb, slh, spo_p, spo_s, spo_r, spl_p, spl_s,
    Hkv, S, T, total, programs, tiles, window, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, SPARSE: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if SPARSE:
        hh = tl.arange(0, HEADS)
        cnt = tl.load(COUNTS + hh, mask=hh < total // tiles, other=0)  # (total = heads * tiles: the capacity)
        ends = tl.cumsum(cnt, 0)
        total = tl.sum(cnt, 0)
    unit = (pid.to(tl.int64) * total // programs).to(tl.int32)
    end = ((pid.to(tl.int64) + 1) * total // programs).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    j = rows // T  # query head within the group
    t = rows % T  # query token
    d = tl.arange(0, D)
    qp = tl.load(QPOS + t, mask=row_ok, other=-1)
    slot = pid * 0  # an int32 tensor, as the loop carries it
    head0 = pid * 0
    if SPARSE:
        head0 = tl.sum((ends <= unit).to(tl.int32), 0)
        tl.store(HEAD0 + pid, head0)
    while unit < end:
        if SPARSE:
            head = tl.sum((ends <= unit).to(tl.int32), 0)
            head_end = tl.sum(tl.where(hh == head, ends, 0), 0)
            head_start = head_end - tl.sum(tl.where(hh == head, cnt, 0), 0)
            slot = head - head0
        else:
            head = unit // tiles
            head_start = head * tiles
            head_end = head_start + tiles
        stop = tl.minimum(end, head_end)
        b = (head // Hkv).to(tl.int64)
        h = (head % Hkv).to(tl.int64)
        q = tl.load(Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        listed = LIST + head * tiles - head_start  # (SPARSE: unit u's tile is listed[u])
        if SPARSE:
            upcoming = tl.load(listed + unit)
        for u in range(unit, stop):
            if SPARSE:  # the next tile's index is loaded a step ahead: the K/V loads never wait on it
                tile = upcoming
                upcoming = tl.load(listed + tl.minimum(u + 1, stop - 1))
            else:
                tile = u - head_start
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < S
            n64 = n.to(tl.int64)
            k = tl.load(K + b * skb + h * skh + n64[:, None] * sks + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + n64[:, None] * svs + d[None, :], mask=n_ok[:, None], other=0.0)
            kp = tl.load(KVPOS + n, mask=n_ok, other=-1)
            s = masked_scores(q, k, kp, qp, row_ok, window, scale, HAS_WINDOW, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        seen = l_i > 0
        denom = tl.where(seen, l_i, 1.0)
        out = acc / denom[:, None]
        lse = tl.where(seen, m_i + tl.log(denom), float("-inf"))
        if (unit == head_start) & (stop == head_end):  # the whole head in this program
            tl.store(OUT + b * sob + (h * G + j)[:, None] * soh + t[:, None] * sot + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
            tl.store(LSE + b * slb + (h * G + j) * slh + t, lse, mask=row_ok)
        else:
            tl.store(PO + pid * spo_p + slot * spo_s + rows[:, None] * spo_r + d[None, :], out, mask=row_ok[:, None])
            tl.store(PL + pid * spl_p + slot * spl_s + rows, lse, mask=row_ok)
        slot += 1
        unit = stop


@triton.jit
def _slot(head, p, total, programs, tiles, HEAD0, SPARSE: tl.constexpr):
    """Where program p stored its partial of `head` (`attention.lean.head_parts`): the heads before it in p's share."""
    if SPARSE:
        return head - tl.load(HEAD0 + tl.minimum(p, programs - 1))  # (masked lanes: p past the last program)
    return head - (p.to(tl.int64) * total // programs).to(tl.int32) // tiles


@triton.jit
def _has_units(p, total, programs, SPARSE: tl.constexpr):
    """Whether program p's share holds any unit (always, when dense: there are at least as many units as programs)."""
    if SPARSE:
        return ((p + 1).to(tl.int64) * total // programs) > (p.to(tl.int64) * total // programs)
    return p >= 0


@triton.jit
def _lean_combine(
    OUT, LSE, PO, PL, COUNTS, HEAD0, sob, soh, sot, slb, slh, spo_p, spo_s, spo_r, spl_p, spl_s, Hkv, T, total, programs, tiles,
    G: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, CHUNK: tl.constexpr, SPARSE: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    """One (head, query row) per program: merge the head's partials, or nothing if one program held the head (a
    head with no units at all, SPARSE only, gets output 0 and lse -inf)."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    if SPARSE:
        hh = tl.arange(0, HEADS)
        cnt = tl.load(COUNTS + hh, mask=hh < total // tiles, other=0)
        ends = tl.cumsum(cnt, 0)
        total = tl.sum(cnt, 0)
        stop = tl.sum(tl.where(hh == head, ends, 0), 0)
        start = stop - tl.sum(tl.where(hh == head, cnt, 0), 0)
    else:
        start = head * tiles
        stop = start + tiles
    p_first = (((start + 1).to(tl.int64) * programs - 1) // tl.maximum(total, 1)).to(tl.int32)
    p_last = ((stop.to(tl.int64) * programs - 1) // tl.maximum(total, 1)).to(tl.int32)
    n = tl.where(stop > start, p_last - p_first + 1, 0)
    if n == 0:
        b = (head // Hkv).to(tl.int64)
        h = (head % Hkv).to(tl.int64)
        j, t = row // T, row % T
        d = tl.arange(0, D)
        tl.store(OUT + b * sob + (h * G + j) * soh + t * sot + d, tl.zeros([D], tl.float32).to(OUT.dtype.element_ty))
        tl.store(LSE + b * slb + (h * G + j) * slh + t, float("-inf"))
    if n > 1:
        parts = tl.arange(0, PARTS)
        p = p_first + parts
        has = (parts < n) & _has_units(p, total, programs, SPARSE)
        lse = tl.load(PL + p * spl_p + _slot(head, p, total, programs, tiles, HEAD0, SPARSE) * spl_s + row, mask=has, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total_w = tl.sum(tl.exp(lse - m_safe), 0)
        d = tl.arange(0, D)
        acc = tl.zeros([D], tl.float32)
        for c in range(0, n, CHUNK):
            i = c + tl.arange(0, CHUNK)
            pc = p_first + i
            slot_c = _slot(head, pc, total, programs, tiles, HEAD0, SPARSE)
            has_c = (i < n) & _has_units(pc, total, programs, SPARSE)
            lse_c = tl.load(PL + pc * spl_p + slot_c * spl_s + row, mask=has_c, other=float("-inf"))
            part = tl.load(PO + (pc * spo_p + slot_c * spo_s + row * spo_r)[:, None] + d[None, :], mask=has_c[:, None], other=0.0)
            acc += tl.sum(tl.exp(lse_c - m_safe)[:, None] * part, 0)
        seen = total_w > 0
        denom = tl.where(seen, total_w, 1.0)
        b = (head // Hkv).to(tl.int64)
        h = (head % Hkv).to(tl.int64)
        j, t = row // T, row % T
        tl.store(OUT + b * sob + (h * G + j) * soh + t * sot + d, (acc / denom).to(OUT.dtype.element_ty))
        tl.store(LSE + b * slb + (h * G + j) * slh + t, tl.where(seen, m + tl.log(denom), float("-inf")))


def run(q, k, v, mask, out, lse, parts_out, parts_lse, programs: int, max_parts: int, config, tile_list=None) -> None:
    """Both launches; `tile_list` = (LIST [heads, tiles], COUNTS [heads], HEAD0 [programs]) for the SPARSE walk,
    with config.block_n keys per tile."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    tiles = triton.cdiv(S, config.block_n)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    strides_out = (out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1))
    strides_parts = (parts_out.stride(0), parts_out.stride(1), parts_out.stride(2), parts_lse.stride(0), parts_lse.stride(1))
    total = B * Hkv * tiles
    sparse = tile_list is not None
    units, counts, head0 = tile_list if sparse else (mask.q_pos,) * 3  # (unused pointers when dense)
    heads = triton.next_power_of_2(B * Hkv)
    _lean_decode[(programs,)](
        q, k, v, mask.q_pos, mask.kv_pos, out, lse, parts_out, parts_lse, units, counts, head0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *strides_out, *strides_parts,
        Hkv, S, T, total, programs, tiles, mask.window or 0, D**-0.5,
        G=G, BLOCK_M=max(16, triton.next_power_of_2(G * T)), BLOCK_N=config.block_n, D=D,
        HAS_WINDOW=mask.window is not None, IEEE=q.dtype.itemsize == 4, SPARSE=sparse, HEADS=heads,
        num_warps=config.warps, num_stages=lean.stages_that_fit(D, q.element_size(), lean.shared_memory(q.device), config),
    )  # fmt: skip
    if max_parts > 1 or sparse:
        _lean_combine[(B * Hkv, G * T)](
            out, lse, parts_out, parts_lse, counts, head0, *strides_out, *strides_parts, Hkv, T, total, programs, tiles,
            G=G, D=D, PARTS=triton.next_power_of_2(max_parts), CHUNK=min(32, triton.next_power_of_2(max_parts)),
            SPARSE=sparse, HEADS=heads,
        )  # fmt: skip
