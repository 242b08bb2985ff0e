"""The KV cache in one byte (FP8 or int8) and phase 1 in chunks: every reader against float64 attention over the
keys as stored, chunked against unchunked, and several gloo ranks against one."""

from __future__ import annotations

import pytest
import torch

from longctx import attention, models
from longctx.attention import kernels
from longctx.attention.cache import KVCache
from longctx.attention.decode import DenseDecode
from longctx.attention.hsr import HSRDecode
from longctx.attention.mask import PositionMask
from longctx.attention.quant import (
    FP8,
    FP8_MAX,
    INT8,
    ONE_BYTE,
    VALUE_TILE,
    dequantize,
    encode,
    from_stored_frame,
    pack,
    quantize,
    rotation,
    round_trip,
    to_stored_frame,
    unpack,
)
from longctx.models.generate import generate_tokens, prefill
from tests.distributed import run_ranks
from tests.helpers import compose_cfg, reference, run_in_interpreter, run_runner

N_CTX, N_QUERY, N_NEW = 45, 4, 5
FORMATS = list(ONE_BYTE.values())  # every one-byte format `kv.dtype` offers


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- storage


def test_fp8_codes_are_within_e4m3s_rounding_with_power_of_two_scales():
    g = torch.Generator().manual_seed(0)
    # tokens of very different magnitudes, a zero token and values spread over many binades within a token
    x = torch.randn(2, 3, 40, 64, generator=g) * torch.logspace(-6, 6, 40)[:, None]
    x *= torch.rand(2, 3, 40, 64, generator=g) ** 4
    x[0, 0, 5] = 0
    q, exponent = encode(x)
    assert q.dtype == FP8 and exponent.dtype == torch.int8  # the scales are powers of two, kept as exponents
    scale = torch.exp2(exponent.float())
    amax = x.abs().amax(-1)
    used = amax / scale
    assert bool(((used > FP8_MAX / 2) & (used <= FP8_MAX))[amax > 0].all())  # the top binade is used, never overflowed
    back = dequantize(q, exponent, torch.float32)
    # normal e4m3 values round to 3 mantissa bits (half a step: 2^-4 relative); below 2^-6 the steps are 2^-9
    bound = torch.maximum(x.abs() * 2**-4, scale[..., None] * 2**-10)
    assert bool(((back - x).abs() <= bound).all())
    assert torch.equal(back[0, 0, 5], torch.zeros(64))
    # a stored value times its scale is exact in bf16: dequantizing there loses nothing
    assert torch.equal(dequantize(q, exponent, torch.bfloat16).float(), back)


def test_every_fp8_code_dequantizes_to_torchs_own_conversion_of_it():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)[None]  # subnormals, zeros of both signs, the largest
    stored = ~codes.float().isnan()  # (the two NaN codes: the quantizer saturates, never stores them)
    for exponent in (-20, 0, 9):
        back = dequantize(codes, torch.full((1,), exponent, dtype=torch.int8), torch.float32)
        assert torch.equal(back[stored], codes.float()[stored] * 2.0**exponent)
        assert torch.equal(back[stored].signbit(), codes.float()[stored].signbit())


def test_int8_codes_are_within_half_a_step_with_power_of_two_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=g) * torch.logspace(-6, 6, 40)[:, None]
    x *= torch.rand(2, 3, 40, 64, generator=g) ** 4
    x[0, 0, 5] = 0
    q, exponent = encode(x, INT8)
    assert q.dtype == INT8 and exponent.dtype == torch.int8
    scale = torch.exp2(exponent.float())
    amax = x.abs().amax(-1)
    top = q.abs().amax(-1).float()
    assert bool(((top >= 64) & (top <= 127))[amax > 0].all())  # the top code's binade is used, never overflowed
    back = dequantize(q, exponent, torch.float32)
    # every value rounds to the nearest multiple of its token's scale
    assert bool(((back - x).abs() <= scale[..., None] / 2).all())
    assert torch.equal(back[0, 0, 5], torch.zeros(64))
    # a 7-bit code times its scale is exact in bf16
    assert torch.equal(dequantize(q, exponent, torch.bfloat16).float(), back)
    # 7 bits against e4m3's 4 for the largest values, which decide a key's scores
    big = x.abs() > amax[..., None] / 2
    assert (back - x).abs()[big].mean() < (dequantize(*encode(x), torch.float32) - x).abs()[big].mean() / 4


@pytest.mark.parametrize("head_dim", [64, 128, 256, 96, 7])
def test_the_rotation_is_orthogonal_and_the_readers_frames_undo_it_exactly(head_dim):
    R = rotation(head_dim)
    torch.testing.assert_close(R @ R.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    n = head_dim & -head_dim  # blocks of the largest power of two dividing the head size
    assert bool(((R.abs() - n**-0.5).abs() < 1e-7)[R != 0].all()) and int((R != 0).sum()) == head_dim * n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, head_dim, generator=g, dtype=torch.float64)
    codes, exponents = quantize(x)
    stored = dequantize(codes, exponents, torch.float64)
    # rotated queries score the stored keys as the queries score the keys given back, in every dtype
    q = torch.randn(3, 2, head_dim, generator=g, dtype=torch.float64)
    back = round_trip(x.float()).double()
    torch.testing.assert_close(to_stored_frame(q) @ stored.mT, q @ back.mT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_stored_frame(stored), back, atol=1e-5, rtol=1e-5)
    # and each token keeps e4m3's relative rounding, as a vector: the rotation keeps lengths
    rel = (back - x).norm(dim=-1) / x.norm(dim=-1)
    assert bool((rel <= 2**-4).all())


@pytest.mark.parametrize("dtype", FORMATS)
def test_the_rotation_cuts_the_score_error_of_keys_with_outlier_channels(dtype):
    # keys whose few channels are large and shared by every token, as real keys have: unrotated, their rounding is
    # what the scores see; rotated, each score's error is the rounding of many values of like size
    g = torch.Generator().manual_seed(0)
    D = 128
    k = torch.randn(512, D, generator=g)
    k[:, :4] += 30 * torch.randn(4, generator=g)
    q = torch.randn(64, D, generator=g)
    q[:, :4] *= 4
    exact = q @ k.T
    plain = (q @ dequantize(*encode(k, dtype), torch.float32).T - exact).abs().mean()
    rotated = (q @ round_trip(k, dtype).T - exact).abs().mean()
    assert rotated < plain / 2


WRITE_KERNEL_CHECK = """
import itertools
import torch
from longctx.attention import quant_triton
from longctx.attention.quant import CODE_MAX, FP8, INT8, quantize, tile_values, value_rows

g = torch.Generator().manual_seed(0)
for D in (16, 64, 128, 256):
    for dtype in (FP8, INT8):
        for given in (torch.float32, torch.bfloat16):
            B, H, n, S = 2, 3, 6, 150
            k = torch.randn(B, H, n, D, generator=g) * torch.logspace(-3, 3, D)  # channels of very unlike size
            top = CODE_MAX[dtype]
            k[0, 0, 0] = 0  # a zero token: exponent 0
            k[0, 0, 1] = 0
            k[0, 0, 1, 0] = top * 2.0**-5  # one channel: every rotated value is +-top / 32, a power-of-two scale
            # two channels: rotated values a+b (the largest, top) and a-b, halfway between two codes (ties to even)
            tie = 17.0 if dtype == FP8 else 2.5
            k[0, 1, 2] = 0
            k[0, 1, 2, :2] = torch.tensor([(top + tie) / 2, (top - tie) / 2])
            # a scale of subnormal size (the inputs normal: the interpreter reads subnormal bf16 inputs wrongly)
            k[1, 2, 3] = (torch.rand(D, generator=g) + 1) * torch.randn(D, generator=g).sign() * 1e-37
            k[1, 2, 4] *= -1e30
            v = torch.randn(B, n, H, D, generator=g).transpose(1, 2)  # strided as a model's are
            k, v = k.to(given), v.to(given)
            slots = torch.tensor([70, 2, 3, 0, S - 1, 64])  # (over three tiles of values)
            values = tile_values(torch.zeros(B, H, S, D, dtype=dtype))
            # values as a cache keeps them (tiles), or as rows; programs of many rows (a pass) or of one (decode)
            for caches, few in itertools.product(
                ([torch.zeros(B, H, S, D, dtype=dtype), values], [torch.zeros(B, H, S, D, dtype=dtype)] * 2), (0, 10**6)
            ):
                caches = [c.clone() for c in caches]
                scales = [torch.full((B, H, S), 99, dtype=torch.int8) for _ in range(2)]
                quant_triton.FEW_ROWS = few
                assert quant_triton.program_shape(B * H * n) == quant_triton.SHAPES.get()[0 if few else 1]
                quant_triton.write(*caches, *scales, slots, k, v)
                for x, cache, scale in zip((k, v), caches, scales):
                    codes, exponents = quantize(x, dtype)
                    assert torch.equal(value_rows(cache, slots).view(torch.int8), codes.view(torch.int8)), (D, dtype)
                    assert torch.equal(scale[:, :, slots], exponents), (D, dtype, given)
                    others = torch.tensor([i for i in range(S) if i not in slots.tolist()])
                    assert value_rows(cache, others).view(torch.int8).eq(0).all() and scale[:, :, others].eq(99).all()
nothing = torch.zeros(1, 2, 0, 16)  # a pass with no new tokens: no launch, nothing written
caches = [torch.zeros(1, 2, 4, 16, dtype=FP8) for _ in range(2)]
quant_triton.write(*caches, *[torch.zeros(1, 2, 4, dtype=torch.int8)] * 2, torch.zeros(0, dtype=torch.long), nothing, nothing)
assert all(c.view(torch.int8).eq(0).all() for c in caches)
print("write ok")
"""


WRITE_IN_A_MODEL = """
import torch
from longctx import attention, models
from longctx.attention import cache as kv_cache
from longctx.attention.quant import FP8
from longctx.models.generate import generate_tokens

args = models.ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=48,
                        max_seq_len=128)
prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0)).tolist()
runs = []
for kernel in (False, True):
    kv_cache.kernel_writes = lambda x, kernel=kernel: kernel  # the GPU's choice, here under the interpreter
    strategy = attention.build("star", block_size=12, anchor_size=7)
    strategy.kv_dtype, strategy.chunk = FP8, 16
    model = models.random_model(args, torch.float32, "cpu", attention=strategy)
    model.setup_cache(1, strategy.cache_slots(36, 4 + 6), dtype=FP8)
    tokens = list(generate_tokens(model, prompt, 6, context_len=36))
    runs.append((tokens, [(layer.k.view(torch.int8), layer.v.view(torch.int8), layer.k_scale, layer.v_scale)
                          for layer in model.cache.layers]))
(tokens, stored), (kernel_tokens, kernel_stored) = runs
assert tokens == kernel_tokens, (tokens, kernel_tokens)
assert all(torch.equal(a, b) for x, y in zip(stored, kernel_stored) for a, b in zip(x, y))
print("model ok")
"""


def test_a_model_writes_its_one_byte_cache_through_the_kernel_as_through_torch_in_the_interpreter():
    """`LayerKV.write` on the kernel's path (taken on CUDA), in chunked star phase 1 and decode: the same cache and the
    same tokens as the PyTorch path."""
    assert "model ok" in run_in_interpreter(WRITE_IN_A_MODEL)


def test_the_write_kernel_stores_quantizes_codes_bit_for_bit_in_the_interpreter():
    """The one-byte cache's Triton write (a GPU's decode and prefill path), run by Triton's CPU interpreter, against
    `quantize`: zeros, power-of-two scales, ties, subnormal and huge scales, strided input."""
    assert "write ok" in run_in_interpreter(WRITE_KERNEL_CHECK)


@pytest.mark.parametrize("dtype", FORMATS)
def test_packed_shards_read_back_as_stored(dtype):
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    (k8, ks), (v8, vs) = quantize(k, dtype), quantize(v, dtype)
    packed = pack(k8, v8, (ks, vs))
    assert packed.dtype == torch.uint8 and packed.nbytes == 2 * 7 * (2 * 8 + 2)  # half of bf16's, and the exponents
    got_k, got_v = unpack(packed, 8, torch.float32, dtype)
    assert torch.equal(got_k, round_trip(k, dtype)) and torch.equal(got_v, round_trip(v, dtype))
    assert all(torch.equal(a, b) for a, b in zip(unpack(pack(k, v), 8, torch.float32, k.dtype), (k, v)))


def _filled_cache(slots: int, n: int, dtype, summarize=None, seed: int = 0):
    """A one-layer cache of `slots` holding n tokens at scattered positions (some slots left empty)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(1, 1, 2, slots, 16, dtype, summarize=summarize, compute_dtype=torch.float32)
    pos = torch.randperm(3 * n, generator=g)[:n].sort().values
    k = torch.randn(1, 2, n, 16, generator=g) * torch.rand(1, 2, n, 1, generator=g) * 8
    v = torch.randn(1, 2, n, 16, generator=g)
    cache.layers[0].write(cache.reserve(pos), k, v)
    return cache, pos, k, v


@pytest.mark.parametrize("queries", [1, 3, 24])  # decode, a short query (dense path), a long one (fused CPU kernel)
# the whole cache at once, or 16 slots at a time merged: into fp32 (off CUDA) or in q's dtype (CUDA's way)
@pytest.mark.parametrize("pieces,fp32", [(None, True), (16, True), (16, False)])
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("keys_back", [False, True])  # the queries rotated to the stored frame, or the keys back
def test_one_byte_cache_reads_equal_float64_attention_over_the_stored_keys(
    queries, pieces, fp32, dtype, keys_back, monkeypatch
):
    if pieces:
        monkeypatch.setattr(kernels, "DEQUANT_SLOTS", pieces)
    monkeypatch.setattr(kernels, "_merges_in_fp32", lambda q: fp32)
    monkeypatch.setattr(kernels, "rotates_keys", lambda q, k, ranges: keys_back)
    cache, pos, k, v = _filled_cache(120, 90, dtype)
    layer = cache.layers[0]
    q = torch.randn(1, 4, queries, 16, generator=torch.Generator().manual_seed(1))
    q_pos = torch.arange(300, 300 + queries) - (queries > 1) * 200  # (a long query sees part of the cache)
    mask = PositionMask(q_pos, cache.positions)
    out = DenseDecode().attend(q, layer, mask, None, 1)
    ref, _ = reference(q, round_trip(k, dtype), round_trip(v, dtype), q_pos.tolist(), pos.tolist(), None)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    # the stored bytes are one byte each: no full-width copy of the cache is kept (values in whole tiles of keys)
    value_slots = -(-120 // VALUE_TILE) * VALUE_TILE
    assert layer.k.dtype == layer.v.dtype == dtype and cache.kv_bytes() == 2 * (120 * (16 + 2) + value_slots * 16)


def test_one_byte_reads_rotate_the_side_with_fewer_rows():
    """A phase-1 pass (queries about as many as the keys they see) rotates its keys back: a KV head's key serves its
    GQA group of query heads; a decode step, or a short chunk over a long cache, rotates its queries."""
    k = torch.zeros(1, 2, 4096, 16)
    # (2 KV heads of 4 query heads: the keys go back while they are fewer than twice the queries)
    for T, ranges, keys_back in [(1, [(0, 4096)], False), (512, [(0, 1000)], True), (512, [(0, 1024)], False),
                                 (512, [(0, 500), (1024, 1500)], True), (64, [(0, 4096)], False)]:  # fmt: skip
        q = torch.zeros(1, 4, T, 16)
        assert kernels.rotates_keys(q, k, ranges) == keys_back, (T, ranges)


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("dtype", FORMATS)
def test_one_byte_reads_dequantize_only_the_slots_a_query_may_see(queries, dtype, monkeypatch):
    """Through a sliding window (or causally) most slots are out of sight: the pieces dequantized start and end at
    visible slots, and the output is still float64 attention over the stored keys."""
    monkeypatch.setattr(kernels, "DEQUANT_SLOTS", 16)
    cache, pos, k, v = _filled_cache(120, 90, dtype)
    layer = cache.layers[0]
    q = torch.randn(1, 4, queries, 16, generator=torch.Generator().manual_seed(4))
    q_pos = torch.arange(150, 150 + queries)
    for window in (None, 40):
        mask = PositionMask(q_pos, cache.positions, window)
        visible = [s for s, p in enumerate(cache.positions.tolist()) if 0 <= p <= q_pos[-1] and (
            window is None or p > q_pos[0] - window)]  # fmt: skip
        ranges = mask.key_ranges(kernels.DEQUANT_SLOTS)
        assert all(any(a <= s < b for a, b in ranges) for s in visible)
        assert all(a in visible and b - 1 in visible for a, b in ranges)  # (trimmed to visible slots)
        out = DenseDecode().attend(q, layer, mask, None, 1)
        ref, _ = reference(q, round_trip(k, dtype), round_trip(v, dtype), q_pos.tolist(), pos.tolist(), window)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", FORMATS)
def test_hsr_reads_one_byte_keys_and_summarizes_them_as_stored(dtype):
    method = HSRDecode(eps=1e-3, block=8, sink=0, recent=8)
    cache, pos, k, v = _filled_cache(128, 128, dtype, summarize=method.summarize, seed=2)
    layer = cache.layers[0]
    # summaries of the keys as the kernels read them: in the stored frame
    codes = dequantize(layer.k, layer.k_scale, torch.float32)
    assert torch.equal(layer.summary.kmax[:, :, 0].float(), codes[:, :, :8].amax(2))
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    out = method.attend(q, layer, PositionMask(torch.tensor([500]), cache.positions), None, 1)
    stored, values = round_trip(k, dtype), round_trip(v, dtype)
    ref, _ = reference(q, stored, values, [500], pos.tolist(), None)
    # within the certificate's bound of the exact output over the stored keys
    bound = method.stats[2] / (1 + method.stats[2]) * (values.amax(2) - values.amin(2)).max()
    assert (out.double() - ref).abs().max() <= bound + 1e-5


# --- phase 1 in chunks, one-byte caches through the model


STRATEGIES = {
    "global": {},
    "ring": {},
    "star": {"block_size": 12, "anchor_size": 7},
}


def _run(path: str, name: str, kv_dtype, chunk, world: int = 1, rank: int = 0):
    """The model's last prefill logits, the stored keys of every layer by position, and greedy tokens."""
    strategy = attention.build(name, **STRATEGIES[name])
    strategy.kv_dtype, strategy.chunk = kv_dtype, chunk
    model = models.load_model(path, dtype=torch.float32, attention=strategy)
    prompt = _tokens(N_CTX + N_QUERY)
    model.setup_cache(1, strategy.cache_slots(N_CTX, N_QUERY), dtype=kv_dtype)
    with torch.inference_mode():
        logits = prefill(model, torch.tensor(prompt), N_CTX)[0, -1]
    cache = model.cache
    held = cache.positions >= 0
    keys = torch.stack(
        [dequantize(layer.k, layer.k_scale, torch.float32) if layer.scales else layer.k for layer in cache.layers]
    )[:, 0, :, held]
    out = {"logits": logits, "positions": cache.positions[held], "keys": keys}
    out["generated"] = list(generate_tokens(model, prompt, N_NEW, context_len=N_CTX))
    return out


def _by_position(runs: list[dict]) -> torch.Tensor:
    pos = torch.cat([r["positions"] for r in runs])
    keys = torch.cat([r["keys"] for r in runs], dim=2)
    return keys[:, :, pos.argsort()]


# int8 where chunking moves its codes (star, whose anchor a chunk recomputes); FP8 runs every reader through the same
# one-byte paths
CHUNKED = [(n, d) for n in STRATEGIES for d in (None, FP8)] + [("star", INT8)]


@pytest.mark.parametrize("name,kv_dtype", CHUNKED)
@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_chunked_phase1_equals_unchunked(name, kv_dtype, family, hf_checkpoint):
    _, path = hf_checkpoint(family)
    whole = _run(str(path), name, kv_dtype, None)
    for chunk in (1, 5, 16):  # token by token; chunks that cut star's blocks and the anchor
        cut = _run(str(path), name, kv_dtype, chunk)
        if kv_dtype != INT8:  # full width and e4m3: equal up to float rounding (e4m3: a chunk of a few queries
            # rotates them to the stored frame, where the whole pass rotates its keys back: `kernels.rotates_keys`)
            torch.testing.assert_close(cut["keys"], whole["keys"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cut["logits"], whole["logits"], atol=1e-5 if kv_dtype is None else 3e-5, rtol=0)
        else:
            _equal_but_for_rounding_across_a_code(cut["keys"], whole["keys"], kv_dtype)
            torch.testing.assert_close(cut["logits"], whole["logits"], atol=5e-3, rtol=0)
        assert cut["generated"] == whole["generated"]


def _equal_but_for_rounding_across_a_code(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """One-byte keys computed in another order: float rounding may carry a value across the boundary between two
    codes (one step: int8's is at most a 64th of the token's largest key, e4m3's an eighth of the value), rarely;
    every other stored key is the same."""
    off = (got - want).abs() > 1e-5
    assert off.float().mean() <= 1e-3, f"{int(off.sum())} of {off.numel()} keys differ"
    if dtype == INT8:
        step = want.abs().amax(-1, keepdim=True).expand_as(want) / 64
    else:
        step = torch.maximum(got.abs(), want.abs()) / 8
    assert bool(((got - want).abs() <= step + 1e-6)[off].all())


@pytest.mark.parametrize("dtype", FORMATS)
def test_a_one_byte_cache_holds_values_of_its_format(dtype, hf_checkpoint):
    # (how close their answers stay to full width is measured on real checkpoints: ACCURACY.md)
    _, path = hf_checkpoint("llama3")
    full, short = (_run(str(path), "global", d, None) for d in (None, dtype))
    assert (short["logits"] - full["logits"]).abs().max() > 0
    # (the keys as stored, in the rotated frame: codes times their power-of-two scales)
    assert torch.equal(short["keys"], dequantize(*encode(short["keys"], dtype), torch.float32))
    assert not torch.equal(full["keys"], dequantize(*encode(full["keys"], dtype), torch.float32))


def _ranks_worker(rank, world, path, name, kv_dtype, chunk):
    return _run(path, name, kv_dtype, chunk, world, rank)


@pytest.mark.parametrize(
    "name,world,chunk,dtype",
    [("ring", 2, None, FP8), ("star", 2, 5, FP8), ("star", 4, 3, FP8), ("ring", 2, None, INT8)],
)
def test_one_byte_kv_over_gloo_ranks_equals_it_on_one_rank(name, world, chunk, dtype, hf_checkpoint):
    _, path = hf_checkpoint("llama3")
    runs = run_ranks(world, _ranks_worker, str(path), name, dtype, chunk)
    one = _run(str(path), "global" if name == "ring" else name, dtype, None)
    # ring's keys come from attention summed in another order than global's: a code may differ by one step
    keys = _by_position(runs)
    _equal_but_for_rounding_across_a_code(keys, one["keys"], dtype)
    atol = 1e-5 if torch.allclose(keys, one["keys"], atol=1e-5, rtol=1e-5) else 5e-3
    for r in runs:
        torch.testing.assert_close(r["logits"], one["logits"], atol=atol, rtol=0)
        assert r["generated"] == one["generated"]


# --- bad input, before anything loads


@pytest.mark.parametrize(
    "overrides,words",
    [
        (("kv.dtype=fp4",), ["kv.dtype", "fp4", "fp8", "int8"]),
        (("kv.dtype=fp16", "device=cpu"), ["kv.dtype=fp16", "float32", "kv.dtype=auto"]),
        (("ctx.chunk=0",), ["ctx.chunk", "0"]),
        (("ctx.chunk=99999",), ["ctx.chunk=99999", "larger than the context", "ctx.length=2048"]),
        (
            ("attention=ring", "parallel.nproc=2", "ctx.chunk=512"),
            ["attention=ring", "ctx.chunk=512", "attention=star"],
        ),
        (
            ("attention=star", "parallel.nproc=2", "attention.params.anchor_mode=recompute", "ctx.chunk=512"),
            ["anchor_mode=recompute", "anchor_mode=broadcast", "ctx.chunk"],
        ),
    ],
)
def test_bad_kv_options_are_refused_by_name(overrides, words):
    from longctx.preflight import options
    from longctx.tasks import TASKS

    with pytest.raises(options.OptionError) as e:
        options.check(compose_cfg("task=plan", "model=llama3", *overrides), TASKS)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_bad_chunk_stops_the_runner_before_loading_with_one_line(tmp_path):
    res = run_runner(tmp_path, "ctx.chunk=99999", "wandb.mode=disabled", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ctx.chunk=99999 is larger than the context"), line


def test_fp8_on_a_gpu_that_cannot_compute_with_it_is_refused(monkeypatch):
    from longctx.preflight import options
    from longctx.tasks import TASKS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cfg = compose_cfg("kv.dtype=fp8", "device=cuda", "task=bench", "model=llama3")
    with pytest.raises(
        options.OptionError, match=r"kv\.dtype=fp8 .*A100.* is 8\.0; use kv\.dtype=int8 .*, auto or bf16"
    ):
        options._check_kv_device(cfg, TASKS["bench"])
    options._check_kv_device(compose_cfg("kv.dtype=int8", "device=cuda", "task=bench", "model=llama3"), TASKS["bench"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    options._check_kv_device(cfg, TASKS["bench"])  # Hopper computes with it


def test_a_new_cache_on_a_device_is_made_after_the_old_one_is_freed_even_from_a_reference_cycle(monkeypatch):
    """setup_cache frees the old cache first, also where a reference cycle still holds it (a GPU run showed one):
    otherwise both sit in device memory until the collector's next pass, a whole cache over the memory plan. (On the
    meta device, which stands for a GPU here.)"""
    import gc
    import weakref

    from longctx.models.transformer import Transformer

    args = models.ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                            intermediate_size=48, max_seq_len=128)  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args)
    cycle = [model.setup_cache(1, 16)]
    cycle.append(cycle)
    old = weakref.ref(cycle[0].layers[0].k)
    seen = []
    real = KVCache.__init__

    def alive_when_made(self, *a, **k):
        seen.append(old() is not None)
        real(self, *a, **k)

    del cycle
    monkeypatch.setattr(KVCache, "__init__", alive_when_made)
    enabled = gc.isenabled()
    gc.disable()  # (no pass of the collector's own in between)
    try:
        model.setup_cache(1, 16)
    finally:
        if enabled:
            gc.enable()
    assert seen == [False] and model.cache.layers[0].k.device.type == "meta"
    # with no cycle, the old cache goes by its references alone, and the collector (a quarter of a second with
    # compiled kernels loaded) is not run
    passes = []
    monkeypatch.setattr(gc, "collect", lambda *a: passes.append(1) or 0)
    model.setup_cache(1, 16)
    assert passes == [] and seen == [False, False]
