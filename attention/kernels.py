"""The local attention kernel every strategy calls: masks from token positions, FlexAttention or a dense path.

A key is visible to a query when it holds a real token (position >= 0), is not in the query's future, and, for
sliding-window layers, lies within the window. Masks are defined on *positions*, not on indices, so a KV cache
whose slots hold non-contiguous positions (a star rank's block, a ring shard) needs no special case.

On CUDA, a mask that is a few full and square-causal pieces (every phase-1 mask here but cutting sliding windows)
runs on a fused SDPA kernel, piece by piece (`attention.fused`). Other masks run on compiled FlexAttention with a
`BlockMask`. It compiles once per (queries, keys) shape, so both lengths are padded up to a bucket (`flex_bucket`,
FLEX_BUCKETS per octave, finer past 8K tokens) with position -1, which no mask lets see or be seen: prompts of a
hundred lengths compile a handful of shapes. On CPU it is PyTorch's fused CPU attention with the same `mask_mod`
evaluated densely, a chunk of queries at a time (compiled CPU FlexAttention does not return the
log-sum-exp); `dense_attend` is the plain reference, also used for float64.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import torch
from torch import Tensor

from longctx.attention import fused

# Queries are processed in chunks whose [chunk, keys] mask has at most this many elements.
MASK_CHUNK_ELEMENTS = 1 << 22
FLEX_MIN_QUERIES = 128
# Below this many queries (decode steps) the dense path wins on CPU: it reads K/V once without expanding GQA heads.
CPU_FLASH_MIN_QUERIES = 16
# Sequence lengths FlexAttention compiles for per octave (None: every length its own shape, and its own compile), and
# the most padding a length gets: long prompts take finer buckets, since their attention costs more than a compile.
# (tools/benchmarks.py shapes: 30 prompts of 1K-9K tokens on an H100 ran in 116 s exact, 67 s with 8 buckets per
# octave, 56 s with 4.)
FLEX_BUCKETS: int | None = 4
FLEX_MAX_STEP = 2048


def flex_bucket(n: int) -> int:
    """The next multiple of 2^k >= n, 2^k the smaller of FLEX_MAX_STEP and a FLEX_BUCKETS-th of n's octave (n itself
    when FLEX_BUCKETS is None, or n is small): powers of two stay as they are, and no length grows by more than
    1 / FLEX_BUCKETS."""
    if FLEX_BUCKETS is None or n <= 2 * FLEX_BUCKETS:
        return n
    step = min(1 << max(0, n.bit_length() - FLEX_BUCKETS.bit_length()), FLEX_MAX_STEP)
    return -(-n // step) * step


@dataclass
class PositionMask:
    """Who attends to whom, for one forward pass and one window size; shared by every layer that uses it."""

    q_pos: Tensor  # [T] positions of the queries
    kv_pos: Tensor  # [S] positions held by the key slots; -1 marks an empty slot
    window: int | None = None
    # Star phase 1: a query sees only keys of its own block (positions // block_size) or of the anchor.
    block_size: int | None = None
    anchor_size: int = 0
    _block_mask: object = field(default=None, repr=False)
    _padded: dict = field(default_factory=dict, repr=False)
    _pieces: tuple = field(default=(), repr=False)

    def mask_mod(self) -> Callable:
        q_pos, kv_pos, window, block, anchor = self.q_pos, self.kv_pos, self.window, self.block_size, self.anchor_size

        def visible(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], kv_pos[kv_idx]
            ok = (kp >= 0) & (kp <= qp)
            if window is not None:  # qp - kp < window, without a [queries, keys] difference in int64
                ok = ok & (kp > qp - window)
            if block is not None:
                ok = ok & ((kp // block == qp // block) | (kp < anchor))
            return ok

        return visible

    def dense(self, q_slice: slice = slice(None)) -> Tensor:
        """Boolean [T, S] (or the rows of `q_slice`)."""
        q_idx = torch.arange(self.q_pos.numel(), device=self.q_pos.device)[q_slice, None]
        kv_idx = torch.arange(self.kv_pos.numel(), device=self.kv_pos.device)[None, :]
        return self.mask_mod()(None, None, q_idx, kv_idx)

    def padded(self, queries: int, keys: int) -> "PositionMask":
        """This mask over `queries` and `keys` slots, the added ones at position -1 (nothing sees them and they see
        nothing); built once and shared by every layer, like the block mask."""
        if (queries, keys) not in self._padded:
            q_pos = torch.nn.functional.pad(self.q_pos, (0, queries - self.q_pos.numel()), value=-1)
            kv_pos = torch.nn.functional.pad(self.kv_pos, (0, keys - self.kv_pos.numel()), value=-1)
            self._padded[queries, keys] = PositionMask(q_pos, kv_pos, self.window, self.block_size, self.anchor_size)
        return self._padded[queries, keys]

    def pieces(self):
        """This mask as full and causal pieces for the fused kernels (`attention.fused.split`), or None; found once
        and shared by every layer, like the block mask."""
        if not self._pieces:
            self._pieces = (fused.split(self.q_pos, self.kv_pos, self.window, self.block_size, self.anchor_size),)
        return self._pieces[0]

    def block_mask(self):
        """The FlexAttention `BlockMask`, built on first use and reused by every layer."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            # _compile: build the mask block by block instead of evaluating mask_mod on the whole
            # [queries, keys] grid, which at 64K tokens takes tens of GB.
            extra = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
            self._block_mask = create_block_mask(
                self.mask_mod(), None, None, self.q_pos.numel(), self.kv_pos.numel(), device=self.q_pos.device, **extra
            )
        return self._block_mask


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
    """FlexAttention kernel options measured faster on this GPU (tools/benchmarks.py prefill --tune).

    On Hopper (bf16/fp16): the Tensor Memory Accelerator for K/V loads, which took causal prefill from 0.64 to 0.70
    of cuDNN SDPA's speed at 32K and from 0.72 to 0.77 at 128K on an H100. (PRESCALE_QK gained 2% more but rounds
    the scaled Q to bf16, which moved the log-sum-exp past tools/check_cuda.py's tolerance.) Elsewhere the defaults.
    """
    if q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(q.device) == (9, 0):
        return {"USE_TMA": True}
    return None


def fused_plan(q: Tensor, k: Tensor, mask: PositionMask) -> tuple[fused.Kernel, list[fused.Piece]] | None:
    """The fused kernel and the pieces a phase-1 call runs on it, or None where it takes FlexAttention."""
    kernel = fused.fused_kernel(q, k)
    pieces = mask.pieces() if kernel is not None else None
    return None if pieces is None else (kernel, pieces)


def _cpu_flash():
    """PyTorch's fused CPU attention that also returns the log-sum-exp, where this torch build has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, return_lse: bool = False):
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] (Hq a multiple of Hkv).

    Returns the output [B, Hq, T, D] in q's dtype and, if asked, the natural-log log-sum-exp [B, Hq, T] in fp32
    (-inf on rows that see no key; their output is 0).
    """
    if use_flex(q):
        plan = fused_plan(q, k, mask)
        if plan is not None:  # full and causal pieces on a fused kernel
            out, lse = fused.fused_attend(q, k, v, plan[1], plan[0])
            return (out, lse) if return_lse else out
        T, S = q.shape[2], k.shape[2]
        Tb, Sb = flex_bucket(T), flex_bucket(S)
        if (Tb, Sb) != (T, S):  # padded to the bucket's shape: no compile for this exact length
            pad = torch.nn.functional.pad
            q, k, v, mask = pad(q, (0, 0, 0, Tb - T)), pad(k, (0, 0, 0, Sb - S)), pad(v, (0, 0, 0, Sb - S)), mask.padded(Tb, Sb)
        out, lse = _compiled_flex()(
            q, k, v, block_mask=mask.block_mask(), enable_gqa=True, return_lse=True, kernel_options=flex_options(q)
        )
        out, lse = out[:, :, :T], lse[:, :, :T]
        return (out, lse.float()) if return_lse else out
    if q.is_cuda:
        from longctx.attention import lean

        if lean.supports(q, k, mask):  # decode: the KV cache split evenly over all SMs
            try:
                out, lse = lean.lean_attend(q, k, v, mask)
                return (out, lse) if return_lse else out
            except lean.LeanDoesNotFit:
                pass  # the dense path below
    if q.device.type == "cpu" and _cpu_flash() is not None and q.dtype != torch.float64 and q.shape[2] >= CPU_FLASH_MIN_QUERIES:
        return cpu_flash_attend(q, k, v, mask, return_lse)
    return dense_attend(q, k, v, mask, return_lse)


def _query_chunks(T: int, S: int) -> list[slice]:
    rows = max(64, MASK_CHUNK_ELEMENTS // max(S, 1))
    return [slice(i, min(i + rows, T)) for i in range(0, T, rows)]


def _visible_keys(visible: Tensor) -> slice | Tensor | None:
    """The key columns a chunk of queries sees at all: a slice where they are contiguous (a causal or sliding-window
    chunk), their indices otherwise (a star block and its anchor), None where every key is visible."""
    cols = visible.any(0)
    if bool(cols.all()):
        return None
    idx = cols.nonzero().squeeze(1)
    if not idx.numel():  # no query of the chunk sees a key: keep them all, every row stays masked
        return None
    if int(idx[-1] - idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _keys_seen(visible: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mask columns, keys and values of the keys a chunk of queries sees (`_visible_keys`)."""
    keys = _visible_keys(visible)
    if isinstance(keys, slice):
        return visible[:, keys], k[:, :, keys], v[:, :, keys]
    if keys is not None:
        return visible[:, keys], k.index_select(2, keys), v.index_select(2, keys)
    return visible, k, v


def cpu_flash_attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, return_lse: bool = False):
    """The fused CPU kernel with an additive mask, built for a chunk of queries at a time.

    Each chunk reads only the keys some of its queries see (as `dense_attend` does): the kernel skips no masked
    work by itself, so a sliding window or a star block would otherwise cost as much as full attention.
    """
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    outs, lses = [], []
    for rows in _query_chunks(q.shape[2], k.shape[2]):
        visible, kc, vc = _keys_seen(mask.dense(rows), k, v)
        bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
        out, lse = _cpu_flash()(q[:, :, rows], kc, vc, 0.0, False, attn_mask=bias)
        seen = visible.any(-1)  # the kernel reports lse 0 for rows that see no key
        outs.append(out)
        lses.append(torch.where(seen, lse.float(), float("-inf")))
        del visible, kc, vc, bias  # before the next chunk's are made: one chunk's workspace at a time
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def dense_attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, return_lse: bool = False):
    """Reference path: scores in fp32 (or float64 for float64 inputs), masked softmax, chunks of queries."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).view(B, Hkv, g, T, D) * D**-0.5
    kf, vf = k.to(acc), v.to(acc)  # each KV head serves its g query heads in one matmul, without copies
    outs, lses = [], []
    for rows in _query_chunks(T, k.shape[2]):
        t = rows.stop - rows.start
        # (Selecting keys syncs with the host: not on CUDA, where this path may run inside a captured graph.)
        visible, kc, vc = (mask.dense(rows), kf, vf) if kf.is_cuda else _keys_seen(mask.dense(rows), kf, vf)
        scores = (qf[:, :, :, rows].reshape(B, Hkv, g * t, D) @ kc.transpose(-1, -2)).view(B, Hkv, g, t, -1)
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(lse.isinf().unsqueeze(-1), 0.0))
        outs.append((probs.view(B, Hkv, g * t, -1) @ vc).view(B, Hkv, g, t, D))
        lses.append(lse)
        del visible, kc, vc, scores, probs  # before the next chunk's are made: one chunk's workspace at a time
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=3).reshape(B, Hq, T)
