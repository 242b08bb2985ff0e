"""Lean Attention decode: the stream-K work split and its partial merge, against float64 dense attention."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from longctx.attention.lean import (
    CONFIG,
    FP8_CONFIG,
    head_parts,
    lean_reference,
    lean_schedule,
    max_slots,
    program_of,
    stages_that_fit,
)
from longctx.attention.mask import PositionMask
from tests.helpers import reference, run_in_interpreter


@pytest.mark.parametrize("heads,tiles,programs", [(1, 1, 1), (8, 100, 132), (16, 7, 5), (3, 2, 50), (64, 2048, 132)])
def test_schedule_covers_every_tile_once_in_equal_shares(heads, tiles, programs):
    programs = min(programs, heads * tiles)
    segments = lean_schedule(heads, tiles, programs)
    covered = collections.Counter((s.head, t) for s in segments for t in range(*s.tiles))
    assert set(covered) == {(h, t) for h in range(heads) for t in range(tiles)}
    assert set(covered.values()) == {1}
    share = collections.Counter()
    for s in segments:
        share[s.program] += s.tiles[1] - s.tiles[0]
        assert s.tiles[0] < s.tiles[1]
    assert max(share.values()) - min(share.values()) <= 1  # stream-K: equal work regardless of head boundaries
    slots = collections.defaultdict(list)
    for s in segments:
        slots[s.program].append(s.slot)
    assert all(v == list(range(len(v))) for v in slots.values())


@pytest.mark.parametrize(
    "heads,tiles,programs", [(1, 1, 1), (8, 100, 132), (16, 7, 5), (3, 2, 6), (64, 2048, 264), (5, 3, 15)]
)
def test_closed_forms_locate_every_partial(heads, tiles, programs):
    """The kernel finds a head's partials and a program's slots by formula; they must match the explicit split."""
    segments = lean_schedule(heads, tiles, programs)
    total = heads * tiles
    for s in segments:
        assert program_of(s.head * tiles + s.tiles[0], total, programs) == s.program
        assert program_of(s.head * tiles + s.tiles[1] - 1, total, programs) == s.program
    for head in range(heads):
        mine = sorted((s.tiles[0], s.program, s.slot) for s in segments if s.head == head)
        assert head_parts(head, tiles, total, programs) == [(p, slot) for _, p, slot in mine]
    assert max_slots(heads, tiles, programs) == 1 + max(s.slot for s in segments)


def test_a_share_spans_head_boundaries():
    segments = lean_schedule(heads=4, tiles=10, programs=3)  # 40 units: shares of 13, 13, 14
    assert [(s.program, s.head, s.tiles) for s in segments] == [
        (0, 0, (0, 10)),
        (0, 1, (0, 3)),
        (1, 1, (3, 10)),
        (1, 2, (0, 6)),
        (2, 2, (6, 10)),
        (2, 3, (0, 10)),
    ]


CASES = {
    "decode": (torch.tensor([299]), torch.arange(300), None),
    "window": (torch.tensor([299]), torch.arange(300), 50),
    "phase2 queries over a sparse cache": (
        torch.arange(500, 503),
        torch.cat([torch.arange(0, 400, 2), torch.full((37,), -1)]),
        None,
    ),
}


@pytest.mark.parametrize("programs", [1, 4, 7, 33, 1000])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_path_equals_dense_attention(case, programs):
    q_pos, kv_pos, window = CASES[case]
    g = torch.Generator().manual_seed(programs)
    B, Hq, Hkv, D = 2, 8, 2, 16
    q = torch.randn(B, Hq, len(q_pos), D, generator=g)
    k = torch.randn(B, Hkv, len(kv_pos), D, generator=g) * 2
    v = torch.randn(B, Hkv, len(kv_pos), D, generator=g)
    tiles = -(-len(kv_pos) // 16)
    out, lse = lean_reference(q, k, v, PositionMask(q_pos, kv_pos, window), min(programs, B * Hkv * tiles), block_n=16)
    ref_out, ref_lse = reference(q, k, v, q_pos.tolist(), kv_pos.tolist(), window)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


KERNEL_CHECK = """
import torch
from longctx.attention import lean
from longctx.attention.dense import dense_attend
from longctx.attention.mask import PositionMask
from longctx.attention.quant import FP8, INT8, dequantize, from_stored_frame, quantize, tile_values, to_stored_frame

ar = torch.arange
cases = [  # B, Hq, Hkv, q_pos, kv_pos, window, programs
    (2, 8, 2, ar(299, 300), ar(300), None, 7),                                     # heads split across programs
    (2, 8, 2, ar(299, 300), ar(300), 50, 1),                                        # one program walks every head
    (1, 8, 8, ar(129, 130), ar(130), None, 1000),                                   # one tile per program
    (3, 8, 2, ar(500, 502), torch.cat([ar(0, 400, 2), torch.full((37,), -1)]), None, 5),  # phase 2 over a sparse cache
    (1, 32, 2, ar(1000, 1005), ar(1005), None, 3),                                  # GQA 16 x 5 queries: two chunks
    (1, 4, 1, ar(10, 11), torch.cat([ar(20, 90), ar(0, 10)]), None, 2),             # a head whose keys are all future
    (1, 4, 1, ar(5999, 6000), ar(6000), None, 40),                                  # 40 partials: merged in 2 chunks
]
for i, (B, hq, hkv, q_pos, kv_pos, window, programs) in enumerate(cases):
    g = torch.Generator().manual_seed(i)
    q = torch.randn(B, hq, len(q_pos), 16, generator=g)
    k = torch.randn(B, hkv, len(kv_pos), 16, generator=g) * 2
    v = torch.randn(B, hkv, len(kv_pos), 16, generator=g)
    mask = PositionMask(q_pos, kv_pos, window)
    ref, ref_lse = dense_attend(q.double(), k.double(), v.double(), mask, return_lse=True)
    out, lse = lean.lean_attend(q, k, v, mask, programs=programs)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
    # the same cache stored in one byte: the kernel scales in its loop, as float64 over the keys as stored
    for one_byte in (FP8, INT8):
        (k8, ke), (v8, ve) = quantize(k, one_byte), quantize(v, one_byte)
        out, lse = lean.lean_attend(q, k8, v8, mask, programs=programs, scales=(ke, ve))
        kd, vd = (dequantize(x, e, torch.float64) for x, e in ((k8, ke), (v8, ve)))
        ref, ref_lse = dense_attend(q.double(), kd, vd, mask, return_lse=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
        # the values in tiles of keys, as a cache keeps them: the same numbers
        tiled = lean.lean_attend(q, k8, tile_values(v8), mask, programs=programs, scales=(ke, ve))
        assert torch.equal(tiled[0], out) and torch.equal(tiled[1], lse), i
        # queries and output in the frame the model gives and takes them, rotated in the kernel: as rotated outside
        # (q' = q S / n; out = out' S^T / n, attention/quant.py)
        given = from_stored_frame(q) * 16
        framed, framed_lse = lean.lean_attend(given, k8, v8, mask, programs, (ke, ve), stored_frame=True)
        torch.testing.assert_close(to_stored_frame(framed).double() * 16, ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(framed_lse.double(), ref_lse, atol=2e-5, rtol=0)
print("kernel ok", len(cases))

# bf16 queries over one-byte keys and values, as on a GPU (rotated in the kernel): keys, values and queries go through
# fp16 in the kernel, the values' scales relative to each tile's largest; values spanning six decades keep fp16's
# relative precision
g = torch.Generator().manual_seed(7)
q = torch.randn(1, 8, 1, 16, generator=g).bfloat16()
k = torch.randn(1, 2, 700, 16, generator=g) * 2
v = torch.randn(1, 2, 700, 16, generator=g) * torch.logspace(-3, 3, 700)[None, None, :, None]
mask = PositionMask(ar(699, 700), ar(700))
for one_byte in (FP8, INT8):
    (k8, ke), (v8, ve) = quantize(k, one_byte), quantize(v, one_byte)
    out, lse = lean.lean_attend(q, k8, tile_values(v8), mask, programs=3, scales=(ke, ve), stored_frame=True)
    kd, vd = (dequantize(x, e, torch.float64) for x, e in ((k8, ke), (v8, ve)))
    # (the kernel rounds the rotated queries to fp16 once, as it rounds the given ones where it does not rotate)
    ref, ref_lse = dense_attend(to_stored_frame(q.double()).half().double(), kd, vd, mask, return_lse=True)
    ref = from_stored_frame(ref)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)
print("bf16 ok")

# A GPU whose shared memory holds programs of 16 query rows at most: the launch of a larger one fails (as Triton
# fails it, before anything runs) and the query tokens go in smaller chunks; where even one token's rows overflow,
# LeanDoesNotFit sends the caller to the dense path.
real = lean._triton().run
def small_gpu(q, k, *args, **kwargs):
    if q.shape[1] // k.shape[1] * q.shape[2] > 16:
        raise lean._triton().OutOfResources(300000, 232448, "shared memory")
    return real(q, k, *args, **kwargs)
lean._triton().run = small_gpu
q, k, v = torch.randn(1, 8, 6, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
mask = PositionMask(ar(300, 306), torch.cat([ar(300)]))
ref, ref_lse = dense_attend(q.double(), k.double(), v.double(), PositionMask(ar(300, 306), ar(300)), return_lse=True)
out, lse = lean.lean_attend(q, k, v, mask, programs=5)
torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
assert lean._ROWS[(16, torch.float32, torch.float32)] == 16
# one-byte keys keep their own count: the overflow above says nothing of their tiles, and theirs nothing of fp32's
assert (16, torch.float32, FP8) not in lean._ROWS
(k8, ke), (v8, ve) = quantize(k, FP8), quantize(v, FP8)
lean.lean_attend(q, k8, tile_values(v8), mask, programs=5, scales=(ke, ve))
assert lean._ROWS[(16, torch.float32, FP8)] == 16 and lean._ROWS[(16, torch.float32, torch.float32)] == 16
try:
    lean.lean_attend(torch.randn(1, 32, 1, 16), k[:, :1], v[:, :1], PositionMask(ar(300, 301), ar(300)))
    raise AssertionError("32 rows of one token should not fit")
except lean.LeanDoesNotFit:
    pass
print("shrink ok")
"""


def test_triton_kernel_equals_dense_attention_in_the_interpreter():
    """The CUDA kernels themselves, run by Triton's CPU interpreter (fp32): stream-K walk, direct writes, combine, at
    full width and over FP8 and int8 keys and values (fp32, and bf16 queries as on a GPU)."""
    out = run_in_interpreter(KERNEL_CHECK)  # (Triton: a dev dependency on Linux x86-64, where CI runs)
    assert "kernel ok 7" in out and "bf16 ok" in out and "shrink ok" in out


H100_SHARED = 227 * 1024  # shared memory one program may use on an H100


def test_pipeline_stages_shrink_to_fit_shared_memory():
    assert stages_that_fit(128, 2, H100_SHARED) == CONFIG.get().stages  # bf16: 64 KB of K/V per stage
    assert stages_that_fit(128, 4, H100_SHARED) == 2  # fp32: three stages would need 280 KB
    assert stages_that_fit(256, 2, H100_SHARED) == 2
    assert stages_that_fit(256, 4, H100_SHARED) == 0  # one stage of fp32 K/V at head dim 256 is already 256 KB
    assert stages_that_fit(64, 4, 99 * 1024) == 2


STRIDES = ("sqb", "sqh", "skb", "skh", "sks", "svb", "svh", "svt", "sob", "soh", "slb", "slh", "spo_p", "spo_s",
           "spo_r", "spl_p", "spl_s", "ssb", "total", "tiles", "v_slots")  # fmt: skip


def _hopper_compile(divisible_by_16: tuple[str, ...] = STRIDES, setting=FP8_CONFIG, rows: int = 16, codes="fp8e4nv"):
    """The decode kernel over one-byte codes (values in tiles, Llama-3.1-8B's group and head dim) compiled for sm_90
    without a GPU under `setting`'s launch settings (the pipeline stages `_fitted` gives an H100) for programs of
    `rows` query rows, as a launch specializes it: the integer arguments named in `divisible_by_16`, and every
    pointer, known to be multiples of 16."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longctx.attention import lean_triton

    fn = lean_triton._lean_decode
    names = fn.arg_names
    config = setting.get()
    stages = stages_that_fit(128, 1, H100_SHARED, config)
    consts = dict(G=4, BLOCK_M=rows, BLOCK_N=config.block_n, D=128, VT=64, HAS_WINDOW=False, IEEE=False, SPARSE=False,
                  HEADS=8, WALK=False, SCALED=True, ROTATE=True, LOG=7, sss=1, sot=1, sqt=1)  # fmt: skip
    pointers = {"Q": "*bf16", "K": f"*{codes}", "V": f"*{codes}", "OUT": "*bf16", "KS": "*i8", "VS": "*i8",
                "QPOS": "*i64", "KVPOS": "*i64", "LSE": "*fp32", "PO": "*fp32", "PL": "*fp32"}  # fmt: skip
    signature = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "scale" else "i32") for n in names}
    aligned = [n for n in names if signature[n].startswith("*") or n in divisible_by_16]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    try:
        return triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=config.warps, num_stages=stages)
        )
    except ImportError as e:  # a Triton without its CUDA backend
        pytest.skip(f"no offline sm_90 compile: {e}")


def test_each_one_byte_setting_fits_its_programs_in_an_h100s_shared_memory():
    """Compiled for an H100 (offline): FP8's decode programs under FP8_CONFIG, and programs of MAX_ROWS query rows
    under ONE_BYTE_CONFIG over FP8 and int8 codes, fit its shared memory; MAX_ROWS rows over FP8_CONFIG's 256-key
    tiles would not (they would hold half the rows, reading the cache twice as often), which is why more rows than
    FP8_ROWS take ONE_BYTE_CONFIG (`lean.launch_setting`)."""
    from longctx.attention.lean import FP8_ROWS, MAX_ROWS, ONE_BYTE_CONFIG

    shared = lambda *args, **kw: _hopper_compile(STRIDES, *args, **kw).metadata.shared  # noqa: E731
    assert shared(FP8_CONFIG, FP8_ROWS) <= H100_SHARED
    assert shared(ONE_BYTE_CONFIG, MAX_ROWS) <= H100_SHARED
    assert shared(ONE_BYTE_CONFIG, MAX_ROWS, codes="i8") <= H100_SHARED
    assert shared(FP8_CONFIG, MAX_ROWS) > H100_SHARED


def test_hopper_code_loads_tiled_values_16_bytes_at_a_time_whatever_the_cache_length():
    """Compiled for an H100 (offline): one-byte values reach the PV product by matrix loads, not a byte per shared-memory
    load (why a cache keeps them in tiles, attention.quant.VALUE_TILE), and their 16-byte asynchronous copies do not
    depend on the cache's slot count being a multiple of 16, which a decode step's cache (context + new tokens) is
    not: masked by that count along the keys, the values' copies became plain loads and FP8 decode fell behind bf16."""
    loose, aligned = (_hopper_compile(x).asm["ptx"] for x in (STRIDES, STRIDES + ("S", "ssh")))
    copies = lambda ptx: len(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx))  # noqa: E731
    assert "ld.shared.b8" not in loose and "ldmatrix" in loose
    assert copies(aligned) >= 32 and copies(loose) == copies(aligned)


def test_each_read_launches_with_the_settings_of_its_format_and_rows(monkeypatch):
    """Full-width keys launch under CONFIG; FP8 codes under FP8_CONFIG in decode (one query token: 8 rows here) and
    under ONE_BYTE_CONFIG in programs of more rows, as int8 codes always do: a setting tuned for one read does not
    reach the others' launches (tiles of other sizes, other program counts)."""
    from contextlib import ExitStack
    from dataclasses import replace
    from types import SimpleNamespace

    from longctx.attention import lean
    from longctx.attention.quant import FP8, INT8, quantize, tile_values

    launched = []

    def run(q, k, v, mask, out, lse, parts_out, parts_lse, programs, max_parts, config, **kwargs):
        launched.append((k.dtype, q.shape[2], config.block_n, config.warps, programs))

    monkeypatch.setattr(lean, "_triton", lambda: SimpleNamespace(run=run, OutOfResources=RuntimeError))
    S, ar = 4096, torch.arange
    k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    distinct = {CONFIG: (16, 1), lean.FP8_CONFIG: (32, 2), lean.ONE_BYTE_CONFIG: (64, 4)}
    reads = [  # stored, query tokens (x 4 query heads per KV head = rows), the settings expected
        (torch.float32, 1, CONFIG),
        (FP8, 1, lean.FP8_CONFIG),
        (FP8, lean.FP8_ROWS // 4 + 1, lean.ONE_BYTE_CONFIG),
        (INT8, 1, lean.ONE_BYTE_CONFIG),
        (INT8, 8, lean.ONE_BYTE_CONFIG),
    ]
    expected = []
    for stored, T, setting in reads:
        q, mask = torch.randn(1, 8, T, 16), PositionMask(ar(S - T, S), ar(S))
        with ExitStack() as stack:
            for each, (b, w) in distinct.items():
                stack.enter_context(each.scoped(replace(each.get(), block_n=b, warps=w, min_tiles=1)))
            if stored == torch.float32:
                lean.lean_attend(q, k, v, mask)
            else:
                (k8, ks), (v8, vs) = quantize(k, stored), quantize(v, stored)
                lean.lean_attend(q, k8, tile_values(v8), mask, scales=(ks, vs))
            b, w = distinct[setting]
            expected.append((stored, T, b, w, min(lean.default_programs(q.device, setting.get()), 2 * S // b)))
    assert launched == expected and len({p for *_, p in launched}) > 1
