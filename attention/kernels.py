"""The local attention kernel every strategy calls (`attend`): it picks the path for a mask (attention.mask) and inputs.

On CUDA, a mask that is a few full and square-causal pieces (every phase-1 mask here but cutting sliding windows)
runs on a fused SDPA kernel, piece by piece (`attention.fused`). Other masks run on compiled FlexAttention with a
`BlockMask`. It compiles once per (queries, keys) shape, so both lengths are padded up to a bucket (`flex_bucket`,
FLEX_BUCKETS per octave, finer past 8K tokens) with position -1, which no mask lets see or be seen: prompts of a
hundred lengths compile a handful of shapes. On CPU it is PyTorch's fused CPU attention with the same `mask_mod`
evaluated densely, a chunk of queries at a time (compiled CPU FlexAttention does not return the
log-sum-exp; attention.dense); the plain reference `dense_attend` takes float64 and decode steps.

Keys and values stored in one byte, FP8 or int8 (attention/quant.py), come with their scales: the Lean kernel applies
them inside its loop; every other path dequantizes DEQUANT_SLOTS slots at a time into the queries' dtype and merges the
partials, so no full-width copy of a cache is ever made.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from longctx.attention import fused, lean
from longctx.attention.dense import cpu_flash_attend, cpu_flash_available, dense_attend
from longctx.attention.fusion import fused_on_cuda
from longctx.attention.mask import PositionMask
from longctx.attention.merge import merge_into, merge_pair
from longctx.attention.quant import dequantize, from_stored_frame, to_stored_frame, value_rows
from longctx.attention.settings import Setting

FLEX_MIN_QUERIES = 128
# Below this many queries (decode steps) the dense path wins on CPU: it reads K/V once without expanding GQA heads.
CPU_FLASH_MIN_QUERIES = 16
# Sequence lengths FlexAttention compiles for per octave (None: every length its own shape, and its own compile), and
# the most padding a length gets: long prompts take finer buckets, since their attention costs more than a compile
# (BENCHMARKS.md, figure `shapes`).
FLEX_BUCKETS: Setting[int | None] = Setting("flex_buckets", 4)
FLEX_MAX_STEP = 2048
# Slots of a one-byte cache dequantized at once where the Lean kernel does not read it: the transient is this many
# slots' keys and values at full width.
DEQUANT_SLOTS = 1 << 16
# On CUDA a piece is dequantized by one compiled kernel: eagerly it became an fp32 copy, a scaled fp32 copy and only
# then the queries' dtype, several times the bytes of one pass (BENCHMARKS.md, figure `fp8-runs`: FP8 TTFT)
_dequantize = fused_on_cuda(dequantize)


@fused_on_cuda
def _dequantize_back(q: Tensor, exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """`dequantize`, rotated back to the frame the keys and values were given in, by a product in `dtype`: a code
    times its scale is exact there, so the product rounds once, as the queries rotated the other way would."""
    return from_stored_frame(dequantize(q, exponent, dtype))


def flex_bucket(n: int) -> int:
    """The next multiple of 2^k >= n, 2^k the smaller of FLEX_MAX_STEP and a FLEX_BUCKETS-th of n's octave (n itself
    when FLEX_BUCKETS is None, or n is small): powers of two stay as they are, and no length grows by more than
    1 / FLEX_BUCKETS."""
    buckets = FLEX_BUCKETS.get()
    if buckets is None or n <= 2 * buckets:
        return n
    step = min(1 << max(0, n.bit_length() - buckets.bit_length()), FLEX_MAX_STEP)
    return -(-n // step) * step


def use_flex(q: Tensor) -> bool:
    # Below 128 queries FlexAttention switches to its decoding kernel, whose autotuning finds no valid config for
    # some shapes (torch 2.11); decode and short phase-2 queries take the Lean decode kernel or the dense path.
    return q.is_cuda and q.shape[2] >= FLEX_MIN_QUERIES


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: FlexAttention's lowering fails on symbolic sequence lengths (torch 2.11). Each new (queries, keys)
    # shape compiles once; raise the recompile limit so that many shapes never drop to the unfused fallback, which
    # materializes the whole score matrix.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_options(q: Tensor) -> dict | None:
    """FlexAttention kernel options measured faster on this GPU (BENCHMARKS.md, figure `flex-tune`).

    On Hopper (bf16/fp16): the Tensor Memory Accelerator for K/V loads. (PRESCALE_QK was a little faster still but
    rounds the scaled Q to bf16, which moved the log-sum-exp past tools/check_cuda.py's tolerance.) Elsewhere the
    defaults.
    """
    if q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(q.device) == (9, 0):
        return {"USE_TMA": True}
    return None


def fused_plan(q: Tensor, k: Tensor, mask: PositionMask) -> tuple[fused.Kernel, list[fused.Piece]] | None:
    """The fused kernel and the pieces a phase-1 call runs on it, or None where it takes FlexAttention."""
    kernel = fused.fused_kernel(q, k)
    pieces = mask.pieces() if kernel is not None else None
    return None if pieces is None else (kernel, pieces)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    return_lse: bool = False,
    scales: tuple[Tensor, Tensor] | None = None,
):
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] (Hq a multiple of Hkv); `scales`: the
    [B, Hkv, S] scales of k and v stored in one byte (v as rows or, as a cache keeps them, tiles:
    `attention.quant.tile_values`).

    Returns the output [B, Hq, T, D] in q's dtype and, if asked, the natural-log log-sum-exp [B, Hq, T] in fp32
    (-inf on rows that see no key; their output is 0).
    """
    if scales is not None:
        out, lse = _attend_stored(q, k, v, scales, mask)
        return (out, lse) if return_lse else out
    if use_flex(q):
        plan = fused_plan(q, k, mask)
        if plan is not None:  # full and causal pieces on a fused kernel
            out, lse = fused.fused_attend(q, k, v, plan[1], plan[0])
            return (out, lse) if return_lse else out
        T, S = q.shape[2], k.shape[2]
        Tb, Sb = flex_bucket(T), flex_bucket(S)
        if (Tb, Sb) != (T, S):  # padded to the bucket's shape: no compile for this exact length
            pad = torch.nn.functional.pad
            q, k, v, mask = (
                pad(q, (0, 0, 0, Tb - T)),
                pad(k, (0, 0, 0, Sb - S)),
                pad(v, (0, 0, 0, Sb - S)),
                mask.padded(Tb, Sb),
            )
        out, lse = _compiled_flex()(
            q, k, v, block_mask=mask.block_mask(), enable_gqa=True, return_lse=True, kernel_options=flex_options(q)
        )
        out, lse = out[:, :, :T], lse[:, :, :T]
        return (out, lse.float()) if return_lse else out
    if q.is_cuda:
        if lean.supports(q, k, mask):  # decode: the KV cache split evenly over all SMs
            try:
                out, lse = lean.lean_attend(q, k, v, mask)
                return (out, lse) if return_lse else out
            except lean.LeanDoesNotFit:
                pass  # the dense path below
    if (
        q.device.type == "cpu"
        and cpu_flash_available()
        and q.dtype != torch.float64
        and q.shape[2] >= CPU_FLASH_MIN_QUERIES
    ):
        return cpu_flash_attend(q, k, v, mask, return_lse)
    return dense_attend(q, k, v, mask, return_lse)


def _attend_stored(q: Tensor, k: Tensor, v: Tensor, scales: tuple[Tensor, Tensor], mask: PositionMask):
    """`attend` over one-byte keys and values, in the frame they are stored in (attention/quant.py). Decode and short
    queries take the Lean kernel, which scales and rotates in its loop; others the pieces (`_attend_codes`), with
    the queries rotated to the stored frame and the output back, or the dequantized keys and values rotated back to
    the queries' frame, whichever rotates fewer rows (`rotates_keys`)."""
    if q.is_cuda and not use_flex(q) and lean.supports(q, k, mask):
        try:
            return lean.lean_attend(q, k, v, mask, scales=scales, stored_frame=True)
        except lean.LeanDoesNotFit:
            pass
    ranges = mask.key_ranges(DEQUANT_SLOTS)
    if rotates_keys(q, k, ranges):
        return _attend_codes(q, k, v, scales, mask, ranges, back=True)
    out, lse = _attend_codes(to_stored_frame(q), k, v, scales, mask, ranges)
    return from_stored_frame(out), lse


def rotates_keys(q: Tensor, k: Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether rotating the keys and values a read dequantizes back to the queries' frame moves fewer rows than
    rotating the queries to the stored frame and the output back: a KV head's key serves all its query heads, so a
    phase-1 pass, whose queries are about as many as the keys they see, rotates a GQA group's share of the rows; a
    decode step, or a chunk over a long cache, rotates its queries."""
    return k.shape[1] * sum(end - start for start, end in ranges) < q.shape[1] * q.shape[2]


def _attend_codes(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scales: tuple[Tensor, Tensor],
    mask: PositionMask,
    ranges: list[tuple[int, int]],
    back: bool = False,
):
    """Attention of q over the stored codes of `ranges`' slots, a range at a time dequantized and merged: q rotated
    to the stored frame, or (`back`) q as it is and each range's keys and values rotated back to its frame."""
    if not ranges:  # no slot holds a token a query may see
        return q.new_zeros(q.shape), torch.full(q.shape[:3], float("-inf"), device=q.device)
    read = _dequantize_back if back else _dequantize
    out = lse = None
    in_fp32 = _merges_in_fp32(q)
    for start, end in ranges:
        keys = slice(start, end)
        k_part = read(k[:, :, keys], scales[0][:, :, keys], q.dtype)
        v_part = read(value_rows(v, keys), scales[1][:, :, keys], q.dtype)
        o, l = attend(q, k_part, v_part, mask.keys(start, end), return_lse=True)
        del k_part, v_part
        if out is None:  # one piece is its own result; more merge
            out, lse = (o.float() if len(ranges) > 1 and in_fp32 else o), l.float()
        elif in_fp32:
            merge_into(out, lse, o, l)
        else:
            out, lse = merge_pair(out, lse, o, l)
    return out.to(q.dtype), lse


def _merges_in_fp32(q: Tensor) -> bool:
    """Whether `_attend_stored` merges its pieces into fp32, a chunk of rows at a time (off CUDA), or in q's dtype,
    one fused pass each, as `fused` merges its own pieces (on CUDA)."""
    return not q.is_cuda
