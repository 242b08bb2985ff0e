"""The Triton kernel of Lean Attention decode (attention/lean.py has the schedule and the closed forms it uses).

Each program walks its equal share of the (batch x KV head x key tile) units. For every head it touches it keeps
an online softmax over the tiles (running max, sum and weighted values, fp32) for all query rows of that KV head.
A head whose whole stretch lies in this program is written out; otherwise the program stores a partial (output,
lse) in its next slot. A second, small kernel then merges the partials of every split head with the rule of
`attention.merge.merge_partials`: one program per (head, query row), all of the head's partials loaded at once.

SPARSE: head h's units are the first COUNTS[h] tiles listed in LIST[h * tiles:], laid end to end in head order;
their number stays on the device. Every program sums COUNTS itself (a head's start and end, the total), so the
shares and the closed forms are those of the dense walk. Two things differ: there can be fewer units than
programs, so some shares are empty, and a head's partials are stored by head, the n-th at [head, n], with their
number in NPARTS[head] (written by the program holding the head's last unit), since heads' lengths vary. The
combine then loads a head's first CHUNK partials, NPARTS and COUNTS at once, waiting on no load to find the others.
It can also write HSR's certificate (CERT), which needs the merged lse.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources  # noqa: F401  (lean.lean_attend catches it)

from longctx.attention.quant import value_tile
from longctx.attention.quant_triton import hadamard, row_signs

COMBINE_CHUNK = 32  # partials the combine merges per step, at most


@triton.jit
def widen(x, dtype: tl.constexpr):
    """One-byte codes x (FP8 or int8) as `dtype`, exactly. An int8 code is read by its bits: x + 128 written into the
    mantissa of the fp16 1024 (bits 0x6400) is 1152 + x, so one xor and one subtraction stand for the int-to-float
    conversion, which left int8 decode well behind FP8's on an H100 (BENCHMARKS.md, figure `fp8-lean`, times both)."""
    if x.dtype == tl.int8:
        bits = (x.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480).to(tl.uint16)
        return (bits.to(tl.float16, bitcast=True) - 1152.0).to(dtype)
    return x.to(dtype)


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
def _fold_tile(q, K, V, KVPOS, kv, n, n_ok, v_slots, sks, svt, qp, row_ok, window, scale, m_i, l_i, acc, ek, ev,
               D: tl.constexpr, VT: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
               SCALED: tl.constexpr):  # fmt: skip
    """The online softmax (running max m_i, sum l_i, weighted values acc) after the keys at slots n (where n_ok).
    SCALED: K and V hold FP8 or int8 codes with a scale per slot (ek, ev: the int8 exponents of the tile's key and value
    scales, `_exponents`), converted in registers (exact) to q's dtype, which the caller made fp16 on GPUs: e4m3 to
    fp16 is one instruction per pair, to bf16 three. The key scales multiply the scores; the value scales the weights,
    relative to the tile's largest (so the weights stay in [0, 1], where fp16 is as good as bf16), the largest then
    multiplying the tile's sum. Products are summed in fp32. V holds tiles of VT keys, [D, VT] each, svt apart (rows:
    VT = 1), v_slots keys in all: its loads are masked by that, a multiple of VT, not by n_ok, so that a mask along the
    keys, which tiles keep side by side, still lets them load 16 bytes at a time (the slots past n_ok hold zeros, and
    their weights are 0)."""
    d = tl.arange(0, D)
    n64 = n.to(tl.int64)
    k = tl.load(K + kv[0] + n64[:, None] * sks + d[None, :], mask=n_ok[:, None], other=0.0)
    v_at = (n64 // VT) * svt + n64 % VT
    v = tl.load(V + kv[1] + v_at[:, None] + d[None, :] * VT, mask=(n < v_slots)[:, None], other=0.0)
    kp = tl.load(KVPOS + n, mask=n_ok, other=-1)
    if SCALED:
        k, v = widen(k, q.dtype), widen(v, q.dtype)
    s = masked_scores(q, k, kp, qp, row_ok, window, scale, HAS_WINDOW, IEEE)
    if SCALED:
        s = s * tl.exp2(ek.to(tl.float32))[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    pv = p
    top = 0.0
    if SCALED:
        evf = ev.to(tl.float32)
        top = tl.max(evf, 0)
        pv = p * tl.exp2(evf - top)[None, :]
    if IEEE:
        pv = tl.dot(pv, v, input_precision="ieee")
    else:
        pv = tl.dot(pv.to(v.dtype), v)
    if SCALED:
        pv = pv * tl.exp2(top)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _exponents(KS, VS, sc, n, S, sss):
    """The int8 exponents of the key and value scales of slots n (those below S: elsewhere 0, and -128 for the
    values)."""
    n_ok = n < S
    n64 = n.to(tl.int64)
    return (tl.load(KS + sc + n64 * sss, mask=n_ok, other=0), tl.load(VS + sc + n64 * sss, mask=n_ok, other=-128))


@triton.jit
def _lean_decode(
    Q, K, V, QPOS, KVPOS, OUT, LSE, PO, PL, LIST, COUNTS, NPARTS, DENSE, KS, VS,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svt, sob, soh, sot, slb, slh, spo_p, spo_s, spo_r, spl_p, spl_s,
    ssb, ssh, sss, Hkv, S, v_slots, T, total, programs, tiles, window, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, VT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, SPARSE: tl.constexpr, HEADS: tl.constexpr, WALK: tl.constexpr,
    SCALED: tl.constexpr, ROTATE: tl.constexpr, LOG: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if SPARSE:
        hh = tl.arange(0, HEADS)
        cnt = tl.load(COUNTS + hh, mask=hh < total // tiles, other=0)  # (total = heads * tiles: the capacity)
        dense = tl.zeros([HEADS], tl.int32)  # heads walking every tile, unlisted
        if WALK:
            dense = tl.load(DENSE + hh, mask=hh < total // tiles, other=0)
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
    while unit < end:
        if SPARSE:
            head = tl.sum((ends <= unit).to(tl.int32), 0)
            head_end = tl.sum(tl.where(hh == head, ends, 0), 0)
            head_start = head_end - tl.sum(tl.where(hh == head, cnt, 0), 0)
        else:
            head = unit // tiles
            head_start = head * tiles
            head_end = head_start + tiles
        stop = tl.minimum(end, head_end)
        b = (head // Hkv).to(tl.int64)
        h = (head % Hkv).to(tl.int64)
        q = tl.load(
            Q + b * sqb + (h * G + j)[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0
        )
        if ROTATE:  # to the frame the keys are stored in (attention.quant.to_stored_frame), in fp32
            q = hadamard(q.to(tl.float32) * row_signs(d)[None, :], BLOCK_M, D, LOG) * (1.0 / D)
        if SCALED and not IEEE:
            q = q.to(tl.float16)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        kv = (b * skb + h * skh, b * svb + h * svh)
        r = tl.arange(0, BLOCK_N)
        sc = b * ssb + h * ssh
        if SPARSE:  # the next tile's index is loaded a step ahead: the K/V loads never wait on it
            listed = LIST + head * tiles - head_start  # (unit u's tile is listed[u])
            walk = tl.sum(tl.where(hh == head, dense, 0), 0) > 0  # every tile in order: unit u is tile u - head_start
            listed_end = tl.where(walk, unit, stop)  # (no list to load for such a head)
            upcoming = tl.where(walk, unit - head_start, tl.load(listed + unit, mask=unit < listed_end, other=0))
        # SCALED: the scales' exponents are loaded a tile ahead, as the SPARSE walk loads its tile indices (there, once
        # the tile is folded, when the next tile's index has arrived). A tile's are BLOCK_N bytes, a byte per thread,
        # too narrow for the asynchronous copies that pipeline K and V, so loaded in the loop they would stall every
        # tile on a memory round trip. (Value codes stored as rows reach the PV product a byte per shared-memory load,
        # as no transposing load takes one-byte elements, hence the cache's tiles, attention.quant.VALUE_TILE; loading
        # rows a tile ahead into registers instead, widened to fp16 there for the transposing load, was slower.)
        ek, ev = tl.zeros([BLOCK_N], tl.int8), tl.zeros([BLOCK_N], tl.int8)
        if SCALED:
            first = unit - head_start
            if SPARSE:
                first = upcoming
            ek, ev = _exponents(KS, VS, sc, first * BLOCK_N + r, S, sss)
        for u in range(unit, stop):
            if SPARSE:
                tile = upcoming
                nxt = tl.minimum(u + 1, stop - 1)
                upcoming = tl.where(walk, nxt - head_start, tl.load(listed + nxt, mask=nxt < listed_end, other=0))
            else:
                tile = u - head_start
            n = tile * BLOCK_N + r
            ek_u, ev_u = ek, ev
            if SCALED and not SPARSE:
                n_next = (tl.minimum(u + 1, stop - 1) - head_start) * BLOCK_N + r
                ek, ev = _exponents(KS, VS, sc, n_next, S, sss)
            m_i, l_i, acc = _fold_tile(
                q, K, V, KVPOS, kv, n, n < S, v_slots, sks, svt, qp, row_ok, window, scale, m_i, l_i, acc,
                ek_u, ev_u, D, VT, HAS_WINDOW, IEEE, SCALED,
            )  # fmt: skip
            if SCALED and SPARSE:  # (the last step loads its own tile's again: the walk's end is clamped)
                ek, ev = _exponents(KS, VS, sc, upcoming * BLOCK_N + r, S, sss)
        seen = l_i > 0
        denom = tl.where(seen, l_i, 1.0)
        out = acc / denom[:, None]
        if ROTATE:  # back from the stored frame (quant.from_stored_frame); partials too, as the merge is linear in them
            out = hadamard(out, BLOCK_M, D, LOG) * row_signs(d)[None, :] * (1.0 / D)
        lse = tl.where(seen, m_i + tl.log(denom), float("-inf"))
        if (unit == head_start) & (stop == head_end):  # the whole head in this program
            tl.store(
                OUT + b * sob + (h * G + j)[:, None] * soh + t[:, None] * sot + d[None, :],
                out.to(OUT.dtype.element_ty),
                mask=row_ok[:, None],
            )
            tl.store(LSE + b * slb + (h * G + j) * slh + t, lse, mask=row_ok)
            if SPARSE:
                tl.store(NPARTS + head, 1)
        else:
            if SPARSE:  # the head's n-th partial: with fewer units than programs, a share holds one unit or none
                nth = tl.where(total < programs, unit - head_start, pid - _first_program(head_start, total, programs))
                at_o = head * spo_p + nth * spo_s
                at_l = head * spl_p + nth * spl_s
                if stop == head_end:
                    tl.store(NPARTS + head, nth + 1)
            else:
                at_o = pid * spo_p + slot * spo_s
                at_l = pid * spl_p + slot * spl_s
            tl.store(PO + at_o + rows[:, None] * spo_r + d[None, :], out, mask=row_ok[:, None])
            tl.store(PL + at_l + rows, lse, mask=row_ok)
        slot += 1
        unit = stop


@triton.jit
def _first_program(start, total, programs):
    """The program whose share holds unit `start` (`attention.lean.program_of`)."""
    return (((start + 1).to(tl.int64) * programs - 1) // tl.maximum(total, 1)).to(tl.int32)


@triton.jit
def _merge_parts(PO, PL, at_o, at_l, spo_r, row, has, m, total_w, acc, D: tl.constexpr):
    """Fold the partials at at_o/at_l (where `has`) into a running merge (max lse m, sum of weights, output)."""
    lse_c = tl.load(PL + at_l + row, mask=has, other=float("-inf"))
    part = tl.load(PO + (at_o + row * spo_r)[:, None] + tl.arange(0, D)[None, :], mask=has[:, None], other=0.0)
    m_new = tl.maximum(m, tl.max(lse_c, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    w = tl.exp(lse_c - m_safe)
    return m_new, total_w * alpha + tl.sum(w, 0), acc * alpha + tl.sum(w[:, None] * part, 0)


@triton.jit
def _lean_combine(
    OUT, LSE, PO, PL, COUNTS, NPARTS, L, UNREAD, CERT, WORST, sob, soh, sot, slb, slh, spo_p, spo_s, spo_r, spl_p, spl_s,
    Hkv, T, total, programs, tiles,
    G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, SPARSE: tl.constexpr, CERTIFY: tl.constexpr, L_ROWS: tl.constexpr,
    HAS_WORST: tl.constexpr,
):  # fmt: skip
    """One (head, query row) per program: merge the head's partials in one pass (online, CHUNK at a time), or
    nothing if one program held the head (a head with no units at all, SPARSE only, gets output 0 and lse -inf).
    CERTIFY: also HSR's certificate exp(L - lse) * UNREAD[head] (0 where nothing is unread), L [heads, L_ROWS];
    HAS_WORST: the largest raised into WORST (a non-negative float64's bits as int64, which order as its values)."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    b = (head // Hkv).to(tl.int64)
    h = (head % Hkv).to(tl.int64)
    j, t = row // T, row % T
    d = tl.arange(0, D)
    at_out = OUT + b * sob + (h * G + j) * soh + t * sot + d
    at_lse = LSE + b * slb + (h * G + j) * slh + t
    m = tl.full([], float("-inf"), tl.float32)
    total_w = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    i = tl.arange(0, CHUNK)
    if SPARSE:  # the first CHUNK partials are loaded with NPARTS and COUNTS, not after them
        ahead = i < programs
        lse_c = tl.load(PL + head * spl_p + i * spl_s + row, mask=ahead, other=float("-inf"))
        part = tl.load(
            PO + (head * spo_p + i * spo_s + row * spo_r)[:, None] + d[None, :], mask=ahead[:, None], other=0.0
        )
        n = tl.where(tl.load(COUNTS + head) > 0, tl.load(NPARTS + head), 0)
        lse_c = tl.where(i < n, lse_c, float("-inf"))
        m = tl.max(lse_c, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse_c - m_safe)
        total_w = tl.sum(w, 0)
        acc = tl.sum(w[:, None] * tl.where((i < n)[:, None], part, 0.0), 0)
        for c in range(CHUNK, n, CHUNK):
            m, total_w, acc = _merge_parts(
                PO,
                PL,
                head * spo_p + (c + i) * spo_s,
                head * spl_p + (c + i) * spl_s,
                spo_r,
                row,
                c + i < n,
                m,
                total_w,
                acc,
                D,
            )
    else:
        start = head * tiles
        p_first = _first_program(start, total, programs)
        n = ((start + tiles).to(tl.int64) * programs - 1) // total - p_first + 1
        if n > 1:
            for c in range(0, n, CHUNK):
                p = p_first + c + i
                slot = head - (p.to(tl.int64) * total // programs).to(tl.int32) // tiles
                m, total_w, acc = _merge_parts(
                    PO,
                    PL,
                    p * spo_p + slot * spo_s,
                    p * spl_p + slot * spl_s,
                    spo_r,
                    row,
                    c + i < n,
                    m,
                    total_w,
                    acc,
                    D,
                )
    lse = tl.full([], float("-inf"), tl.float32)
    if CERTIFY:
        unread = tl.load(UNREAD + head)
        L_row = tl.load(L + head * L_ROWS + row)
        if n == 1:  # (written by the decode kernel)
            lse = tl.load(at_lse)
    if n == 0:
        tl.store(at_out, tl.zeros([D], tl.float32).to(OUT.dtype.element_ty))
        tl.store(at_lse, lse)
    if n > 1:
        seen = total_w > 0
        denom = tl.where(seen, total_w, 1.0)
        lse = tl.where(seen, m + tl.log(denom), float("-inf"))
        tl.store(at_out, (acc / denom).to(OUT.dtype.element_ty))
        tl.store(at_lse, lse)
    if CERTIFY:
        cert = tl.where(unread > 0, tl.exp(L_row - lse) * unread, 0.0)
        tl.store(CERT + b * slb + (h * G + j) * slh + t, cert)
        if HAS_WORST:
            tl.atomic_max(WORST, cert.to(tl.float64).to(tl.int64, bitcast=True))


def run(q, k, v, mask, out, lse, parts_out, parts_lse, programs: int, max_parts: int, config, tile_list=None, certify=None,
        worst=None, scales=None, rotate: bool = False) -> None:  # fmt: skip
    """Both launches, with `config`'s settings (its stages already fitted to shared memory: `lean._fitted`).

    `tile_list` = (LIST [heads, tiles], COUNTS [heads], NPARTS [heads], DENSE [heads] or None) for the SPARSE walk (a
    DENSE head walks all its tiles in order, with COUNTS = tiles, no list), with config.block_n keys per tile
    (partials by head: parts_out [heads, programs, rows, D]); `certify` = (L [heads, L_ROWS], UNREAD [heads], CERT
    like lse) for the combine to write HSR's certificate, and raise `worst` to the largest
    (`lean.lean_sparse_attend`). `scales`: the exponents (int8 [B, Hkv, S]) of the scales of k, v stored in one byte
    (v as rows or tiles); `rotate`: q to their stored frame, the output back (a power-of-two head dim)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    tiles = triton.cdiv(S, config.block_n)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    tile = value_tile(v)  # values in tiles of keys (attention.quant.tile_values), or rows
    if tile > 1 and v.stride(-2) != tile:
        v = v.contiguous()
    strides_out = (out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1))
    strides_parts = (
        parts_out.stride(0),
        parts_out.stride(1),
        parts_out.stride(2),
        parts_lse.stride(0),
        parts_lse.stride(1),
    )
    total = B * Hkv * tiles
    sparse = tile_list is not None
    units, counts, nparts, dense = tile_list if sparse else (mask.q_pos,) * 4  # (unused pointers when dense)
    walk = dense is not None
    dense = dense if walk else counts
    L, unread, cert = certify if certify is not None else (lse,) * 3
    heads = triton.next_power_of_2(B * Hkv)
    ks, vs = scales if scales is not None else (lse, lse)  # (unused pointers at full width)
    if scales is not None and (ks.stride() != vs.stride() or ks.stride(-1) != 1):
        ks, vs = ks.contiguous(), vs.contiguous()
    _lean_decode[(programs,)](
        q, k, v, mask.q_pos, mask.kv_pos, out, lse, parts_out, parts_lse, units, counts, nparts, dense, ks, vs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *strides_out, *strides_parts,
        *((ks.stride(0), ks.stride(1), ks.stride(2)) if scales is not None else (0, 0, 0)),
        Hkv, S, v.shape[2] * tile, T, total, programs, tiles, mask.window or 0, D**-0.5,
        G=G, BLOCK_M=max(16, triton.next_power_of_2(G * T)), BLOCK_N=config.block_n, D=D, VT=tile,
        HAS_WINDOW=mask.window is not None, IEEE=q.dtype.itemsize == 4, SPARSE=sparse, HEADS=heads, WALK=walk,
        SCALED=scales is not None, ROTATE=rotate, LOG=D.bit_length() - 1, num_warps=config.warps,
        num_stages=config.stages,
    )  # fmt: skip
    if max_parts > 1 or sparse:
        _lean_combine[(B * Hkv, G * T)](
            out, lse, parts_out, parts_lse, counts, nparts, L, unread, cert, worst if worst is not None else counts, *strides_out, *strides_parts, Hkv, T, total,
            programs, tiles, G=G, D=D, CHUNK=min(COMBINE_CHUNK, triton.next_power_of_2(max_parts)), SPARSE=sparse,
            CERTIFY=certify is not None, L_ROWS=L.shape[-1] if certify is not None else 1, HAS_WORST=worst is not None,
        )  # fmt: skip
