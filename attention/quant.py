"""FP8 (e4m3) storage of keys and values: one power-of-two scale per token and KV head, set when the token is written.

Why this granularity: a token's scale is fixed once it is written, so decode appends without re-quantizing a block
that is still filling, and no calibration data is needed (BENCHMARKS.md, figure `fp8-scales`: on real keys and
values every scale that keeps the largest value in range gives the same error, since e4m3 is a float format; a
fixed one clips). Why a power of two: e4m3 keeps 3 mantissa bits at every exponent, so rounding the scale up to a
power of two costs no precision; the scale is stored as its exponent, one int8 per `head_dim` FP8 bytes; and a
stored value times its scale is exact in bf16 (and fp32). Every reader therefore computes the same numbers whether
it dequantizes first (the PyTorch paths) or applies the scale to the scores and weights after its matrix products
(the Lean kernel), and a shard sent in FP8 reads back as it is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs that convert e4m3 in hardware


def is_fp8(dtype: torch.dtype | None) -> bool:
    return dtype == FP8


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] as FP8 and the exponents [...] (int8) of its scales: x ≈ q * 2^e[..., None], |q| <= FP8_MAX."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    # amax / FP8_MAX = m * 2^e with m in [0.5, 1): the scale 2^e keeps every |x| / scale below FP8_MAX
    exponent = torch.where(amax > 0, torch.frexp(amax / FP8_MAX).exponent, 0).clamp(-127, 127)
    scale = torch.exp2(exponent.float())
    return (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), exponent.to(torch.int8)


def dequantize(q: Tensor, exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """The values q [..., D] stand for, in `dtype`."""
    return (q.float() * torch.exp2(exponent.float()).unsqueeze(-1)).to(dtype)


def round_trip(x: Tensor) -> Tensor:
    """x as FP8 storage gives it back, in x's dtype."""
    return dequantize(*quantize(x), x.dtype)


def pack(k: Tensor, v: Tensor, scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Keys and values [B, H, n, D] as stored, in one tensor to send: k | v on the last dim at full width; in FP8
    (`scales`: their exponents) their bytes and a byte each for the exponents, about half the bytes of bf16."""
    if scales is None:
        return torch.cat([k, v], -1).contiguous()
    exponents = [e.unsqueeze(-1).view(torch.uint8) for e in scales]
    return torch.cat([k.view(torch.uint8), v.view(torch.uint8), *exponents], -1).contiguous()


def unpack(packed: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`pack`'s keys and values, in `dtype`."""
    D = head_dim
    if packed.dtype != torch.uint8:
        return packed[..., :D].to(dtype), packed[..., D:].to(dtype)
    k, v = packed[..., :D].view(FP8), packed[..., D : 2 * D].view(FP8)
    ke, ve = packed[..., 2 * D].view(torch.int8), packed[..., 2 * D + 1].view(torch.int8)
    return dequantize(k, ke, dtype), dequantize(v, ve, dtype)


def packed_width(head_dim: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """The last dim and dtype of `pack`'s tensor for keys stored in `dtype`."""
    return (2 * head_dim + 2, torch.uint8) if is_fp8(dtype) else (2 * head_dim, dtype)
