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

Why a rotation first: a key's few large channels decide its scores, and e4m3 keeps 4 bits of every value, so their
rounding moved SmolLM2's answers (ACCURACY.md). Each token's key and value are stored rotated by one fixed orthogonal
matrix per head size, a Walsh-Hadamard matrix with fixed signs on its rows (`rotation`): that spreads a large channel
over all of them, so a score's error is the rounding of many values of like size, not of the few that dominate.
Scores and weights are the same in either frame (q . k = qR . kR), so a reader that takes the stored codes as they are
rotates the queries and rotates its output back (`to_stored_frame`, `from_stored_frame`), and the softmax between
them, with its log-sum-exp, is untouched. The stored rows are x @ S for a matrix S of +-1 entries (S S^T = n I); the
readers' matrices are S / n and S^T / n, exact in every float dtype (n a power of two), so no rounding of the matrix
skews the frames apart; a reader rounds the rotated queries to their dtype once (bf16 on GPUs: far below e4m3's
rounding; tools/check_cuda.py compares against float64 of the queries so rounded). Writers rotate by butterflies
(`_hadamard`), which add each row's values in one order whatever the shape, so every rank, chunk and device stores
the same codes of the same keys. int8 keeps 7 bits for the largest values where e4m3 keeps 4; the rotation narrows that gap
and lowers int8's error as well (BENCHMARKS.md, figure `fp8-scales`).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
INT8 = torch.int8
CODE_MAX = {FP8: 448.0, INT8: 127.0}  # the largest code each one-byte format stores
ONE_BYTE = {"fp8": FP8, "int8": INT8}  # the formats by the names `kv.dtype` takes
FP8_MAX = CODE_MAX[FP8]
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs that convert e4m3 in hardware
# Row i of S has sign -1 where bit SIGN_BIT of i * SIGN_HASH is set: bit 13 of i times Knuth's multiplicative-hash
# constant, whose low 14 bits are all that bit depends on, small enough for int32 index arithmetic in a compiled
# kernel (attention/quant_triton.py computes the same signs)
SIGN_HASH, SIGN_BIT = 14769, 13


def is_quantized(dtype: torch.dtype | None) -> bool:
    """Whether a cache of `dtype` stores codes with scales (one byte per value) rather than the values."""
    return dtype in CODE_MAX


def quantize(x: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """x [..., D] as stored: the codes of `dtype` of x rotated (module docstring) and the exponents [...] (int8) of
    their scales, x @ S ≈ q * 2^e[..., None]."""
    return encode(_hadamard(x.float()), dtype)


def encode(x: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """x [..., D] as codes of `dtype` and the exponents [...] (int8) of their scales: x ≈ q * 2^e[..., None]."""
    top = CODE_MAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(-1)
    # the least e with amax / 2^e <= top: amax / top = m * 2^f with m in [0.5, 1) gives f, or f - 1 where m is 0.5
    # (so that values read back from the cache encode to the same codes)
    m, f = torch.frexp(amax / top)
    exponent = torch.where(amax > 0, f - (m == 0.5).to(f.dtype), 0).clamp(-127, 127)
    scaled = (xf / torch.exp2(exponent.float()).unsqueeze(-1)).clamp(-top, top)
    return (scaled.round() if dtype == INT8 else scaled).to(dtype), exponent.to(torch.int8)


def dequantize(q: Tensor, exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """The values q [..., D] stand for, in `dtype`, in the stored (rotated) frame: what the kernels read."""
    exponent = exponent.float()
    if q.dtype == FP8 and not q.is_cuda:
        codes, exponent = _fp8_in_fp16(q).float(), exponent + 8
    else:
        codes = q.float()
    return (codes * torch.exp2(exponent).unsqueeze(-1)).to(dtype)


def _fp8_in_fp16(q: Tensor) -> Tensor:
    """e4m3 codes as fp16 of 2^-8 times their value, exactly (NaN aside, which no code stored here holds): fp16 has
    their mantissa bits and one more exponent bit, with a bias 8 higher. Moving the bits is several times faster on
    CPU than torch's element-by-element conversion of FP8."""
    b = q.view(torch.int8).to(torch.int16)
    return ((b & 0x7F) << 7 | (b & -0x8000)).view(torch.float16)


def read_back(q: Tensor, exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """The values q [..., D] stand for, in `dtype`, rotated back to the frame they were given in."""
    return from_stored_frame(dequantize(q, exponent, torch.float32)).to(dtype)


def round_trip(x: Tensor, dtype: torch.dtype = FP8) -> Tensor:
    """x as a cache of `dtype` gives it back, in x's dtype and frame."""
    return read_back(*quantize(x, dtype), x.dtype)


def to_stored_frame(q: Tensor) -> Tensor:
    """Queries [..., D] rotated as the stored keys are, in q's dtype: their scores against the stored keys are those
    of q against the keys."""
    return q @ _signs(q.shape[-1], q.device, q.dtype, 1)


def from_stored_frame(out: Tensor) -> Tensor:
    """An output [..., D] of weights over stored values, rotated back: the output over the values."""
    return out @ _signs(out.shape[-1], out.device, out.dtype, -1)


def rotation(head_dim: int, device: torch.device | str | None = None) -> Tensor:
    """The orthogonal matrix R [D, D] (fp32) that keys and values are rotated by before they are stored (x @ R):
    block diagonal, one Walsh-Hadamard block for the largest power of two n dividing D (all of D for every head
    size of the families here), its rows' signs fixed, over sqrt(n)."""
    n = head_dim & -head_dim
    return _build_signs(head_dim, torch.device(device or "cpu"), torch.float32, 0) / n**0.5


def _signs(head_dim: int, device: torch.device, dtype: torch.dtype, side: int) -> Tensor:
    """S [D, D] of +-1 entries (block diagonal, blocks of n, S S^T = n I); `side` 1: S / n, -1: S^T / n (the
    readers', one matrix product each). Made once per (D, device, dtype, side), as a few device operations, so that a
    captured CUDA graph finds it made; a compiled caller builds it in its graph instead."""
    if torch.compiler.is_compiling():
        return _build_signs(head_dim, device, dtype, side)
    return _cached_signs(head_dim, device, dtype, side)


@cache
def _cached_signs(head_dim: int, device: torch.device, dtype: torch.dtype, side: int) -> Tensor:
    return _build_signs(head_dim, device, dtype, side)


def _row_signs(head_dim: int, device: torch.device) -> Tensor:
    """+-1 per row of S (int64): fixed and irregular, so that no channel lines up with a column of the Hadamard."""
    i = torch.arange(head_dim, device=device)
    return 1 - 2 * (((i * SIGN_HASH) >> SIGN_BIT) & 1)


def _hadamard(x: Tensor) -> Tensor:
    """x @ S by butterflies (log2 n steps of sums and differences): each row's values are added in the same order
    whatever the shape around them, so every rank, chunk and device stores the same codes of the same keys."""
    D = x.shape[-1]
    n = D & -D
    x = x * _row_signs(D, x.device).to(x.dtype)
    h = 1
    while h < n:
        pairs = x.unflatten(-1, (D // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), -2).flatten(-3)
        h *= 2
    return x


def _build_signs(head_dim: int, device: torch.device, dtype: torch.dtype, side: int) -> Tensor:
    n = head_dim & -head_dim
    i = torch.arange(head_dim, device=device)
    common = (i[:, None] % n) & (i[None, :] % n)
    parity = torch.zeros_like(common)
    for bit in range(n.bit_length()):
        parity ^= (common >> bit) & 1  # H[i, j] = (-1)^popcount(i & j), as the butterflies make it
    S = torch.where((i[:, None] // n) == (i[None, :] // n), 1 - 2 * parity, 0) * _row_signs(head_dim, device)[:, None]
    S = S.to(dtype)
    if side == 0:
        return S
    return (S if side > 0 else S.T) / n


# Keys per tile of a cache's one-byte values, which it stores tile by tile transposed, [B, H, tiles, D, VALUE_TILE]
# (`tile_values`): the weighted sum of values contracts over keys, and a tensor-core product wants its operand's
# elements along the contracted dim side by side in memory. Keys are contracted over D, so rows of them load as they
# are stored; values stored as rows would reach the product a byte per shared-memory load, as no transposing load
# on these GPUs takes one-byte elements (BENCHMARKS.md, figure `fp8-lean`).
VALUE_TILE = 64


def value_tiles(slots: int) -> int:
    """Tiles of VALUE_TILE keys that hold `slots` values."""
    return -(-slots // VALUE_TILE)


def value_tile(v: Tensor) -> int:
    """Keys per tile of values stored in tiles (`tile_values`); 1 for rows [B, H, S, D]."""
    return v.shape[-1] if v.dim() == 5 else 1


def tile_values(v: Tensor) -> Tensor:
    """One-byte values [B, H, S, D] as a cache stores them: [B, H, tiles, D, VALUE_TILE], zeros past S."""
    B, H, S, D = v.shape
    tiles = value_tiles(S)
    rows = torch.nn.functional.pad(v.view(torch.uint8), (0, 0, 0, tiles * VALUE_TILE - S))
    return rows.view(B, H, tiles, VALUE_TILE, D).transpose(-1, -2).contiguous().view(v.dtype)


def _as_rows(v: Tensor) -> Tensor:
    """Tiled values (`tile_values`) viewed as [B, H, tiles, VALUE_TILE, D] (strided, no copy); rows as they are."""
    return v.transpose(-1, -2) if v.dim() == 5 else v


def value_rows(v: Tensor, keys: Tensor | slice) -> Tensor:
    """The values of slots `keys` [B, H, n, D], from rows [B, H, S, D] or tiles (`tile_values`; a copy)."""
    if v.dim() == 4:
        return v[:, :, keys]
    T = v.shape[-1]
    if isinstance(keys, slice):
        start, stop, _ = keys.indices(v.shape[2] * T)
        first, last = start // T, -(-stop // T)
        rows = _as_rows(v[:, :, first:last]).reshape(*v.shape[:2], -1, v.shape[-2])
        return rows[:, :, start - first * T : stop - first * T]
    return _as_rows(v)[:, :, keys // T, keys % T]


def store_value_rows(v: Tensor, slots: Tensor, rows: Tensor) -> None:
    """Write rows [B, H, n, D] to slots `slots` of values stored as rows or tiles (`tile_values`)."""
    if v.dim() == 4:
        v[:, :, slots] = rows
    else:
        T = v.shape[-1]
        _as_rows(v)[:, :, slots // T, slots % T] = rows


def pack(k: Tensor, v: Tensor, scales: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Keys and values [B, H, n, D] as stored, in one tensor to send: k | v on the last dim at full width; in one
    byte (`scales`: their exponents) their bytes and a byte each for the exponents, about half the bytes of bf16."""
    if scales is None:
        return torch.cat([k, v], -1).contiguous()
    exponents = [e.unsqueeze(-1).view(torch.uint8) for e in scales]
    return torch.cat([k.view(torch.uint8), v.view(torch.uint8), *exponents], -1).contiguous()


def unpack(packed: Tensor, head_dim: int, dtype: torch.dtype, stored: torch.dtype) -> tuple[Tensor, Tensor]:
    """`pack`'s keys and values, stored in `stored`, in `dtype` (and the frame they were given in)."""
    D = head_dim
    if not is_quantized(stored):
        return packed[..., :D].to(dtype), packed[..., D:].to(dtype)
    k, v = packed[..., :D].view(stored), packed[..., D : 2 * D].view(stored)
    ke, ve = packed[..., 2 * D].view(torch.int8), packed[..., 2 * D + 1].view(torch.int8)
    return read_back(k, ke, dtype), read_back(v, ve, dtype)


def packed_width(head_dim: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """The last dim and dtype of `pack`'s tensor for keys stored in `dtype`."""
    return (2 * head_dim + 2, torch.uint8) if is_quantized(dtype) else (2 * head_dim, dtype)
