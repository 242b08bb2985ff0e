"""The one-byte cache's write as one Triton kernel: rotate, encode and store new keys and values (attention/quant.py).

Compiled from PyTorch, the rotation's butterflies become several kernels per tensor (each stage reads values the
previous one wrote), which a decode step pays in every layer. Here a program holds whole rows in registers and runs
the same butterflies in the same order, then `encode`'s steps, so the codes and exponents are those of
`quant.quantize`, bit for bit: keys and values in one launch.

Stage by stage a row's index bits turn: its pairs are taken on the lowest bit, and the sums and differences put back
on the highest, so that after log2(D) stages every bit has been paired once and the order is the original one.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from longctx.attention.quant import CODE_MAX, INT8, SIGN_BIT, SIGN_HASH, value_tile
from longctx.attention.settings import Setting

# Rows (tokens x KV heads) a program rotates and encodes, and its warps, for a launch over few rows (a decode step's KV
# heads) and over many (a pass's): one row and one warp, then four rows and one warp; a warp's butterflies need no
# barriers between warps (BENCHMARKS.md, figure `fp8-write`: each the fastest of the shapes timed on an H100)
SHAPES: Setting[tuple[tuple[int, int], tuple[int, int]]] = Setting("write_shapes", ((1, 1), (4, 1)))
FEW_ROWS = 64  # up to this many rows a launch takes the first shape
_HASH, _BIT = tl.constexpr(SIGN_HASH), tl.constexpr(SIGN_BIT)  # (a kernel reads globals only as constexprs)


@triton.jit
def hadamard(x, R: tl.constexpr, D: tl.constexpr, LOG: tl.constexpr):
    """Rows x [R, D] times the Walsh-Hadamard matrix H (S is H with its rows' signs, quant._hadamard): stage k sums
    and subtracts the pairs that differ in bit k."""
    for _ in tl.static_range(LOG):
        a, b = tl.split(tl.reshape(x, [R, D // 2, 2]))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), [R, D])
    return x


@triton.jit
def row_signs(d):
    """quant._row_signs of channels d, as fp32."""
    return (1 - 2 * (((d * _HASH) >> _BIT) & 1)).to(tl.float32)


@triton.jit
def _exponent(amax, TOP: tl.constexpr):
    """`quant.encode`'s exponent: the least e with amax / TOP <= 2^e (0 where amax is 0), from the bits of the
    quotient as frexp reads them, clamped to [-127, 127]."""
    bits = tl.math.div_rn(amax, TOP).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    normal = biased - 126 - (mantissa == 0).to(tl.int32)
    subnormal = tl.where(mantissa > (1 << 22), -126, -127)  # 2^-149 * mantissa, at most 2^-127 up to 2^22
    e = tl.where(biased == 0, subnormal, normal)
    return tl.where(amax > 0, tl.minimum(e, 127), 0)


@triton.jit
def _to_grid(y, INT: tl.constexpr):
    """y (fp32, within the format's range) rounded to the nearest code, ties to even, still in fp32, so that the
    conversion after it is exact (Triton's CPU interpreter truncates where a GPU rounds). Adding 1.5 * 2^23 steps and
    taking it away rounds to a multiple of the step: 1 for int8, for e4m3 2^(p - 3) at binary exponent p (p >= -6,
    below which e4m3's codes are evenly spaced)."""
    bits = y.to(tl.int32, bitcast=True)
    if INT:
        step_exponent = tl.zeros_like(bits)
    else:
        step_exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    magic = (((step_exponent + 23 + 127) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    rounded = ((y + magic) - magic).to(tl.int32, bitcast=True)
    sign = (bits >> 31) << 31  # y's sign bit alone (int32 shifts): a zero keeps it, as a cast does
    return (rounded | sign).to(tl.float32, bitcast=True)


@triton.jit
def _write(
    XK, XV, SLOTS, CK, CV, EK, EV, rows, n, H,
    sxkb, sxkh, sxkt, sxvb, sxvh, sxvt, sckb, sckh, scks, scvb, scvh, scvt, sekb, sekh, seks, sevb, sevh, sevs,
    TOP: tl.constexpr, INT: tl.constexpr, R: tl.constexpr, D: tl.constexpr, LOG: tl.constexpr, VT: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # (int64 offsets: a long pass's rows times strides)
    ok = r < rows
    t = r % n
    h = (r // n) % H
    b = r // (n * H)
    d = tl.arange(0, D)
    slot = tl.load(SLOTS + t, mask=ok, other=0)
    keys = tl.program_id(1) == 0
    if keys:
        x_at = XK + b * sxkb + h * sxkh + t * sxkt
        e_at = EK + b * sekb + h * sekh + slot * seks
    else:
        x_at = XV + b * sxvb + h * sxvh + t * sxvt
        e_at = EV + b * sevb + h * sevh + slot * sevs
    x = tl.load(x_at[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x = hadamard(x * row_signs(d)[None, :], R, D, LOG)
    e = _exponent(tl.max(tl.abs(x), 1), TOP)
    inverse = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, exact (e <= 120 for a finite fp32 amax)
    scaled = _to_grid(tl.minimum(tl.maximum(x * inverse[:, None], -TOP), TOP), INT)
    codes = scaled.to(CK.dtype.element_ty)
    if keys:  # rows
        tl.store(CK + (b * sckb + h * sckh + slot * scks)[:, None] + d[None, :], codes, mask=ok[:, None])
    else:  # tiles of VT keys, [D, VT] each (attention.quant.tile_values)
        at = b * scvb + h * scvh + (slot // VT) * scvt + slot % VT
        tl.store(CV + at[:, None] + d[None, :] * VT, codes, mask=ok[:, None])
    tl.store(e_at, e.to(tl.int8), mask=ok)


def write(
    k_cache: Tensor, v_cache: Tensor, k_scale: Tensor, v_scale: Tensor, slots: Tensor, k: Tensor, v: Tensor
) -> None:
    """Store k, v [B, H, n, D] (D a power of two) at `slots` of the one-byte caches, keys [B, H, slots, D] and values
    in tiles (`attention.quant.tile_values`), and their scales' exponents [B, H, slots], as
    `cache.write_kv_quantized` does."""
    B, H, n, D = k.shape
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    rows = B * H * n
    if rows == 0:
        return
    strides = [x.stride(i) for x in (k, v, k_cache, v_cache, k_scale, v_scale) for i in range(3)]
    tile = value_tile(v_cache)
    per, warps = program_shape(rows)
    _write[(triton.cdiv(rows, per), 2)](
        k, v, slots, k_cache, v_cache, k_scale, v_scale, rows, n, H, *strides,
        TOP=CODE_MAX[k_cache.dtype], INT=k_cache.dtype == INT8, R=per, D=D, LOG=D.bit_length() - 1, VT=tile,
        num_warps=warps,
    )  # fmt: skip


def program_shape(rows: int) -> tuple[int, int]:
    """(rows per program, warps) of a launch over `rows` rows."""
    few, many = SHAPES.get()
    return few if rows <= FEW_ROWS else many
