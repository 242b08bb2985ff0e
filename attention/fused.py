"""Phase-1 attention on fused SDPA kernels: every mask here is a few full and square-causal pieces.

Each phase-1 mask of this project (global causal, a ring step, a star block with its anchor, a query over a KV
cache) is a union of two shapes over contiguous slots: *full* (a run of queries sees every key of a run of keys,
all earlier than its first query) and *causal* (a run of queries against the same run of positions, lower
triangular). `split` finds those pieces from the positions alone, once per mask; `fused_attend` runs each on a
fused kernel that returns the log-sum-exp and combines the partials with the one (output, lse) merge. Squares of
one size side by side (star's blocks, ring's two zig-zag chunks) run as one batched call; full pieces over the
same keys for adjacent query runs run as one.

Sliding windows that cut, layouts of more than MAX_CALLS pieces and masks of several pieces whose queries see fewer
than FUSED_MIN_KEYS_PER_QUERY keys on average stay on FlexAttention (`split` gives None).
Which kernel runs the pieces is data: FUSED_KERNELS, by GPU capability (BENCHMARKS.md, figure `prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from longctx.attention.merge import merge_pair
from longctx.attention.settings import Setting

# Most kernel calls a mask may take before FlexAttention (one call, any mask) is the better choice.
MAX_CALLS = 16

# GPU capability -> the fused kernel measured fastest for both shapes there (BENCHMARKS.md, figure `prefill`: on an
# H100 cuDNN beat compiled FlexAttention and the flash op, causal and full, at both head dims; the memory-efficient op
# needs K/V repeated to every query head and was slowest). Unmeasured GPUs keep Flex. A measurement that compares
# kernels changes it for a scope: `with FUSED_KERNELS.scoped({}): ...` runs everything on Flex.
FUSED_KERNELS: Setting[dict[tuple[int, int], str]] = Setting("fused_kernels", {(9, 0): "cudnn"})
# Masks of several pieces run fused where a query sees this many keys on average: merging costs per query, the kernels
# per (query, key) pair, so a mask of few keys per query merges more than the kernels gain (figure `prefill`: star's 4
# blocks, about 5/16 of the context per query, ran slower than on Flex at 8K tokens and faster at 32K; a phase-1
# chunk of a long context sees far more keys than it has queries).
FUSED_MIN_KEYS_PER_QUERY: Setting[int] = Setting("fused_min_keys_per_query", 5120)
# Longer causal runs are cut into equal squares (batched) and the full pieces between them: cuDNN's causal kernel
# slows past 64K tokens, where full attention does not (figure `prefill`).
MAX_CAUSAL_SQUARE = 65536
FUSED_DTYPES = (torch.bfloat16, torch.float16)
FUSED_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Piece:
    """Queries `rows` against keys `keys` (slot index ranges). `causal`: `count` squares side by side, square i
    being rows and keys [start + i*n, start + (i+1)*n) with n = len / count; else every row sees every key."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    causal: bool
    count: int = 1


def _runs(pos: Tensor) -> list[tuple[int, int]]:
    """[start, end) index ranges of real slots (position >= 0) whose positions go up by one."""
    valid = pos >= 0
    if not bool(valid.any()):
        return []
    idx = valid.nonzero().squeeze(1)
    p = pos[idx]
    breaks = ((idx[1:] - idx[:-1] != 1) | (p[1:] - p[:-1] != 1)).nonzero().squeeze(1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), idx.numel()]
    return [(int(idx[s]), int(idx[e - 1]) + 1) for s, e in zip(starts, ends)]


def _cut(runs: list[tuple[int, int]], pos: Tensor, cuts: list[int]) -> list[tuple[int, int, int]]:
    """Runs cut at each position in `cuts` that falls strictly inside them: (start, end, first position)."""
    out = []
    for s, e in runs:
        p0 = int(pos[s])
        inside = [c for c in cuts if p0 < c < p0 + (e - s)]
        bounds = [s, *(s + c - p0 for c in inside), e]
        out += [(a, b, p0 + a - s) for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def split(q_pos: Tensor, kv_pos: Tensor, window: int | None, block: int | None, anchor: int) -> list[Piece] | None:
    """The full and causal pieces whose union is the mask (kernels.PositionMask's rule), or None where the mask is
    not such a union in at most MAX_CALLS calls. Runs on the host (one copy of the positions per mask)."""
    q_pos, kv_pos = q_pos.cpu(), kv_pos.cpu()
    q_runs, kv_runs = _runs(q_pos), _runs(kv_pos)
    if not q_runs or not kv_runs:
        return []
    hi = max(int(q_pos[e - 1]) for _, e in q_runs)  # the last query's position
    if window is not None:
        lo = min(int(kv_pos[s]) for s, _ in kv_runs)
        if hi - lo >= window:  # the window cuts some query's keys: not a full or causal shape
            return None
    # positions where a run must end so that any query run and key run are either identical or disjoint
    cuts = {int(pos[s]) for pos, runs in ((q_pos, q_runs), (kv_pos, kv_runs)) for s, _ in runs}
    cuts |= {int(pos[e - 1]) + 1 for pos, runs in ((q_pos, q_runs), (kv_pos, kv_runs)) for _, e in runs}
    for s, e in q_runs:  # long causal runs as equal squares of at most MAX_CAUSAL_SQUARE
        parts = -(-(e - s) // MAX_CAUSAL_SQUARE)
        cuts |= {int(q_pos[s]) + i * (e - s) // parts for i in range(1, parts)}
    if block is not None:
        if hi // block > 4 * MAX_CALLS:
            return None
        cuts |= {anchor, *range(block, hi + 1, block)}
    cuts = sorted(cuts)
    qs, ks = _cut(q_runs, q_pos, cuts), _cut(kv_runs, kv_pos, cuts)
    full: list[tuple[tuple[int, int], tuple[int, int]]] = []
    causal: list[tuple[int, int, int, int]] = []
    for qa, qb, qp in qs:
        for ka, kb, kp in ks:
            if block is not None and kp // block != qp // block and kp + (kb - ka) > anchor:
                continue  # another block's keys, not the anchor's
            if kp + (kb - ka) <= qp:
                full.append(((qa, qb), (ka, kb)))
            elif kp == qp:  # identical positions (the cuts make overlapping runs identical)
                causal.append((qa, qb, ka, kb))
    pieces = _merge_full(full) + _batch_causal(causal)
    if len(pieces) > MAX_CALLS or (len(pieces) > 1 and _pairs(pieces) < FUSED_MIN_KEYS_PER_QUERY.get() * len(q_pos)):
        return None
    return pieces


def _pairs(pieces: list[Piece]) -> int:
    """The (query, key) pairs the pieces attend."""
    total = 0
    for p in pieces:
        rows = p.rows[1] - p.rows[0]
        total += rows * (rows // p.count + 1) // 2 if p.causal else rows * (p.keys[1] - p.keys[0])
    return total


def _merge_full(full: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[Piece]:
    """Adjacent keys of one query run become one piece; then adjacent query runs over the same keys."""
    by_rows: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rows, keys in full:
        by_rows.setdefault(rows, []).append(keys)
    merged: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for rows, keys in sorted(by_rows.items()):
        keys.sort()
        spans = [list(keys[0])]
        for a, b in keys[1:]:
            if a == spans[-1][1]:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        merged += [(rows, tuple(s)) for s in spans]
    merged.sort(key=lambda p: (p[1], p[0]))
    out: list[list] = []
    for rows, keys in merged:
        if out and out[-1][1] == keys and out[-1][0][1] == rows[0]:
            out[-1][0] = (out[-1][0][0], rows[1])
        else:
            out.append([rows, keys])
    return [Piece(rows, keys, causal=False) for rows, keys in out]


def _batch_causal(causal: list[tuple[int, int, int, int]]) -> list[Piece]:
    """Squares of one size whose rows and keys follow on from the previous square's become one batched piece."""
    out: list[Piece] = []
    for qa, qb, ka, kb in sorted(causal):
        n = qb - qa
        last = out[-1] if out else None
        if (
            last is not None
            and (last.rows[1] - last.rows[0]) // last.count == n
            and last.rows[1] == qa
            and last.keys[1] == ka
        ):
            out[-1] = Piece((last.rows[0], qb), (last.keys[0], kb), True, last.count + 1)
        else:
            out.append(Piece((qa, qb), (ka, kb), True))
    return out


Kernel = Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor]]


def cudnn_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """cuDNN's fused attention with the log-sum-exp (a private op of torch 2.5+): GQA without copies of K/V."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    return out, lse.reshape(q.shape[:3]).float()


def _available(name: str) -> bool:
    if name == "cudnn":
        return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention") and torch.backends.cudnn.is_available()
    return False


KERNELS: dict[str, Kernel] = {"cudnn": cudnn_kernel}


def fused_kernel(q: Tensor, k: Tensor) -> Kernel | None:
    """The fused kernel for these inputs on this GPU (FUSED_KERNELS), or None: FlexAttention then."""
    if not q.is_cuda or q.dtype not in FUSED_DTYPES or q.shape[-1] > FUSED_MAX_HEAD_DIM or q.shape[-1] % 8:
        return None
    name = FUSED_KERNELS.get().get(torch.cuda.get_device_capability(q.device))
    return KERNELS[name] if name is not None and _available(name) else None


def _squares(x: Tensor, span: tuple[int, int], count: int) -> Tensor:
    """Slots `span` of x [B, H, S, D] as `count` equal squares stacked on the batch: [count*B, H, S/count, D]."""
    B, H, _, D = x.shape
    part = x[:, :, span[0] : span[1]]
    if count == 1:
        return part
    return part.unflatten(2, (count, -1)).movedim(2, 0).reshape(count * B, H, -1, D)


def fused_attend(q: Tensor, k: Tensor, v: Tensor, pieces: list[Piece], kernel: Kernel) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] as the union of `pieces` (from `split`), each run by
    `kernel(q, k, v, causal) -> (out, lse [B, H, T] fp32)`. Returns out in q's dtype and lse fp32 (-inf, with
    output 0, on rows no piece covers).

    A piece's rows that no earlier piece wrote take its result as it is; rows already written merge with it (one
    fused pass per piece on CUDA); most masks' causal pieces cover every row, so they go first."""
    T = q.shape[2]
    out = lse = None
    written: list[tuple[int, int]] = []
    for piece in sorted(pieces, key=lambda p: (not p.causal, p.rows)):
        o, l = _run(q, k, v, piece, kernel)
        if out is None and piece.rows == (0, T):
            out, lse = o, l
        else:
            if out is None:
                out, lse = _nothing_seen(q)
            first = piece.rows[0]
            for a, b, seen in _segments(written, *piece.rows):
                rows, part = slice(a, b), slice(a - first, b - first)
                if seen:
                    out[:, :, rows], lse[:, :, rows] = merge_pair(
                        out[:, :, rows], lse[:, :, rows], o[:, :, part], l[:, :, part]
                    )
                else:
                    out[:, :, rows], lse[:, :, rows] = o[:, :, part], l[:, :, part]
        written.append(piece.rows)
        del o, l
    return (out, lse) if out is not None else _nothing_seen(q)


def _nothing_seen(q: Tensor) -> tuple[Tensor, Tensor]:
    """Output 0 and lse -inf for every query row: rows that no piece covers."""
    return q.new_zeros(q.shape), torch.full(q.shape[:3], float("-inf"), device=q.device)


def _segments(written: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int, bool]]:
    """[a, b) cut at the bounds of the `written` ranges: (start, end, whether a written range holds it)."""
    cuts = sorted({a, b} | {x for r in written for x in r if a < x < b})
    return [(s, e, any(ws <= s and e <= we for ws, we in written)) for s, e in zip(cuts[:-1], cuts[1:])]


def _run(q: Tensor, k: Tensor, v: Tensor, piece: Piece, kernel: Kernel) -> tuple[Tensor, Tensor]:
    """One piece's (out [B, Hq, rows, D], lse [B, Hq, rows])."""
    n = piece.count
    o, l = kernel(_squares(q, piece.rows, n), _squares(k, piece.keys, n), _squares(v, piece.keys, n), piece.causal)
    if n == 1:
        return o, l
    B = q.shape[0]
    return o.unflatten(0, (n, B)).movedim(0, 2).flatten(2, 3), l.unflatten(0, (n, B)).movedim(0, 2).flatten(2, 3)
