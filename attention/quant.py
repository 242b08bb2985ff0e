"""Keys and values in one byte each, FP8 (e4m3) or int8: one power-of-two scale per token and KV head, set when the
token is written.

Why this granularity: a token's scale is fixed once it is written, so decode appends without re-quantizing a block
that is still filling, and no calibration data is needed (BENCHMARKS.md, figure `fp8-scales`: on real keys and
values every scale that keeps the largest value in range gives the same e4m3 error, since e4m3 is a float format; a
fixed one clips). Why a power of two: e4m3 keeps 3 mantissa bits at every exponent, so rounding the scale up to a
power of two costs it no precision (int8 loses under one bit of its top code); the scale is stored as its exponent,
one int8 per `head_dim` bytes; and a stored code times its scale is exact in bf16 (and fp32): an int8 code has 7
bits, an e4m3 one 4. Every reader therefore computes the same numbers whether it dequantizes first (the PyTorch
paths) or applies the scale to the scores and weights after its matrix products (the Lean kernel), and a shard sent
in one byte reads back as it is stored.

Why int8 beside e4m3: a key's largest channels decide its scores, and int8 keeps 7 bits for them where e4m3 keeps 4
for every value; on real checkpoints int8 answers RULER as the full-width cache does far more often (ACCURACY.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
INT8 = torch.int8
CODE_MAX = {FP8: 448.0, INT8: 127.0}  # the largest code each one-byte format stores
ONE_BYTE = {"fp8": FP8, "int8": INT8}  # the formats by the names `kv.dtype` takes
FP8_MAX = CODE_MAX[FP8]
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs that convert e4m3 in hardware


def is_quantized(dtype: torch.dtype | None) -> bool:
    """Whether a cache of `dtype` stores codes with scales (one byte per value) rather than the values."""
    return dtype in CODE_MAX


def quantize(x: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """x [..., D] as codes of `dtype` and the exponents [...] (int8) of their scales: x ≈ q * 2^e[..., None]."""
    top = CODE_MAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(-1)
    # the least e with amax / 2^e <= top: amax / top = m * 2^f with m in [0.5, 1) gives f, or f - 1 where m is 0.5
    # (so that values read back from the cache quantize to the same codes)
    m, f = torch.frexp(amax / top)
    exponent = torch.where(amax > 0, f - (m == 0.5).to(f.dtype), 0).clamp(-127, 127)
    scaled = (xf / torch.exp2(exponent.float()).unsqueeze(-1)).clamp(-top, top)
    return (scaled.round() if dtype == INT8 else scaled).to(dtype), exponent.to(torch.int8)


def dequantize(q: Tensor, exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """The values q [..., D] stand for, in `dtype`."""
    return (q.float() * torch.exp2(exponent.float()).unsqueeze(-1)).to(dtype)


def round_trip(x: Tensor, dtype: torch.dtype = FP8) -> Tensor:
    """x as a cache of `dtype` gives it back, in x's dtype."""
    return dequantize(*quantize(x, dtype), x.dtype)


def pack(k: Tensor, v: Tensor, scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Keys and values [B, H, n, D] as stored, in one tensor to send: k | v on the last dim at full width; in one
    byte (`scales`: their exponents) their bytes and a byte each for the exponents, about half the bytes of bf16."""
    if scales is None:
        return torch.cat([k, v], -1).contiguous()
    exponents = [e.unsqueeze(-1).view(torch.uint8) for e in scales]
    return torch.cat([k.view(torch.uint8), v.view(torch.uint8), *exponents], -1).contiguous()


def unpack(packed: Tensor, head_dim: int, dtype: torch.dtype, stored: torch.dtype) -> tuple[Tensor, Tensor]:
    """`pack`'s keys and values, stored in `stored`, in `dtype`."""
    D = head_dim
    if not is_quantized(stored):
        return packed[..., :D].to(dtype), packed[..., D:].to(dtype)
    k, v = packed[..., :D].view(stored), packed[..., D : 2 * D].view(stored)
    ke, ve = packed[..., 2 * D].view(torch.int8), packed[..., 2 * D + 1].view(torch.int8)
    return dequantize(k, ke, dtype), dequantize(v, ve, dtype)


def packed_width(head_dim: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """The last dim and dtype of `pack`'s tensor for keys stored in `dtype`."""
    return (2 * head_dim + 2, torch.uint8) if is_quantized(dtype) else (2 * head_dim, dtype)
