"""Attention written out in PyTorch: the float64 reference (`dense_attend`) and the CPU path (`cpu_flash_attend`).

Both evaluate the mask densely for a chunk of queries at a time and read only the keys some query of the chunk sees,
so a sliding window or a star block costs what it attends, not full attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.attention.mask import PositionMask

# Queries are processed in chunks whose [chunk, keys] mask has at most this many elements.
MASK_CHUNK_ELEMENTS = 1 << 22


def _cpu_flash():
    """PyTorch's fused CPU attention that also returns the log-sum-exp, where this torch build has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_flash_available() -> bool:
    return _cpu_flash() is not None


def _query_chunks(T: int, S: int) -> list[slice]:
    rows = max(64, MASK_CHUNK_ELEMENTS // max(S, 1))
    return [slice(i, min(i + rows, T)) for i in range(0, T, rows)]


def _keys_seen(mask: PositionMask, rows: slice, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mask, keys and values of the key slots a chunk of queries sees (`PositionMask.seen_keys`)."""
    keys = mask.seen_keys(rows)
    visible = mask.dense(rows, keys)
    if keys is None:
        return visible, k, v
    if isinstance(keys, Tensor):
        return visible, k.index_select(2, keys), v.index_select(2, keys)
    if len(keys) == 1:
        ((start, end),) = keys
        return visible, k[:, :, start:end], v[:, :, start:end]
    return visible, *(torch.cat([x[:, :, start:end] for start, end in keys], dim=2) for x in (k, v))


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
        visible, kc, vc = _keys_seen(mask, rows, k, v)
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
        visible, kc, vc = (mask.dense(rows), kf, vf) if kf.is_cuda else _keys_seen(mask, rows, kf, vf)
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
