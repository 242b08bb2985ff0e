"""The local attention kernels against attention written out densely in float64."""

from __future__ import annotations

import pytest
import torch

from longctx.attention import dense
from longctx.attention.dense import cpu_flash_attend, dense_attend
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from tests.helpers import reference

CASES = {
    "causal": (torch.arange(24), torch.arange(24), None),
    "window": (torch.arange(24), torch.arange(24), 5),
    # a cache holding a star-style block: anchor positions 0..5, own block 30..39, empty slots at the end
    "sparse_cache": (
        torch.arange(30, 40),
        torch.cat([torch.arange(6), torch.arange(30, 40), torch.full((4,), -1)]),
        None,
    ),
    # queries before every key see nothing: output 0, lse -inf
    "empty_rows": (torch.tensor([0, 1, 2, 50]), torch.arange(3, 20), None),
}


@pytest.mark.parametrize("kernel", [attend, cpu_flash_attend, dense_attend])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_match_float64_reference(kernel, case):
    q_pos, kv_pos, window = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, len(q_pos), 16, generator=g)
    k = torch.randn(2, 2, len(kv_pos), 16, generator=g) * 2
    v = torch.randn(2, 2, len(kv_pos), 16, generator=g)
    out, lse = kernel(q, k, v, PositionMask(q_pos, kv_pos, window), return_lse=True)
    ref_out, ref_lse = reference(q, k, v, q_pos.tolist(), kv_pos.tolist(), window)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
    if case == "empty_rows":
        assert torch.isinf(lse[:, :, :3]).all() and (out[:, :, :3] == 0).all()


def test_float64_inputs_stay_float64():
    pos = torch.arange(7)
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    out, lse = attend(q, k, v, PositionMask(pos, pos), return_lse=True)
    ref_out, ref_lse = reference(q, k, v, pos.tolist(), pos.tolist(), None)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=0)


@pytest.mark.parametrize("window,block,anchor", [(40, None, 0), (None, None, 0), (None, 30, 10), (20, 30, 10)])
def test_query_chunking_is_seamless(monkeypatch, window, block, anchor):
    """Chunks of 64 queries: the CPU kernel reads a key range (causal, window) or scattered keys (a star block and
    its anchor) per chunk; every row must still see exactly its keys."""
    from longctx.attention import dense

    monkeypatch.setattr(dense, "MASK_CHUNK_ELEMENTS", 64 * 10)  # force several chunks of 64 rows
    pos = torch.arange(150)
    q, k, v = torch.randn(1, 4, 150, 8), torch.randn(1, 2, 150, 8), torch.randn(1, 2, 150, 8)
    mask = PositionMask(pos, pos, window, block, anchor)
    ref, ref_lse = reference(q, k, v, pos.tolist(), pos.tolist(), window, block, anchor)
    for kernel in (cpu_flash_attend, dense_attend):
        out, lse = kernel(q, k, v, mask, return_lse=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


def test_cpu_kernel_reads_only_the_keys_a_chunk_sees():
    from longctx.attention import mask as masks

    rows, at = torch.arange(64, 128), slice(0, 64)
    assert PositionMask(rows, torch.arange(150)).seen_keys(at) == ((0, 128),)
    assert PositionMask(rows, torch.arange(150), 20).seen_keys(at) == ((64 - 19, 128),)
    star = PositionMask(rows, torch.arange(150), None, 30, 10)  # anchor 0..9, blocks 60.., 90.., 120..
    assert star.seen_keys(at) == ((0, 10), (60, 128))
    assert torch.equal(star.dense(at, star.seen_keys(at)), star.dense(at)[:, list(range(10)) + list(range(60, 128))])
    assert PositionMask(torch.arange(5), torch.arange(5)).seen_keys(slice(0, 5)) is None  # the last row sees all
    assert PositionMask(torch.arange(5), torch.full((5,), -1)).seen_keys(slice(0, 5)) is None  # none: all, masked
    # slots holding scattered positions: more runs than MAX_RUNS are kept as indices
    scattered = torch.arange(4 * masks.MAX_RUNS) * torch.tensor([1, -1]).repeat(2 * masks.MAX_RUNS)
    odd = PositionMask(torch.tensor([10**6]), scattered)
    keys = odd.seen_keys(slice(0, 1))
    assert torch.equal(keys, torch.arange(0, 4 * masks.MAX_RUNS, 2))
    assert torch.equal(odd.dense(slice(0, 1), keys), torch.ones(1, 2 * masks.MAX_RUNS, dtype=torch.bool))


def test_cpu_kernels_find_a_masks_keys_once_for_every_layer(monkeypatch):
    """The seen keys of a chunk are found once per mask: a second layer over the same mask evaluates only the seen
    slots, not the whole [rows, slots] mask again."""
    S = 300
    mask = PositionMask(torch.arange(S), torch.arange(S), 16)
    q, k, v = torch.randn(1, 2, S, 8), torch.randn(1, 1, S, 8), torch.randn(1, 1, S, 8)
    evaluated = []
    mask_mod = PositionMask.mask_mod

    def counting(self):
        rule = mask_mod(self)

        def visible(b, h, q_idx, kv_idx):
            evaluated.append(q_idx.numel() * kv_idx.numel())
            return rule(b, h, q_idx, kv_idx)

        return visible

    monkeypatch.setattr(PositionMask, "mask_mod", counting)
    monkeypatch.setattr(dense, "MASK_CHUNK_ELEMENTS", 64 * S)  # chunks of 64 queries
    first = cpu_flash_attend(q, k, v, mask)
    once = sum(evaluated)
    evaluated.clear()
    torch.testing.assert_close(cpu_flash_attend(q, k, v, mask), first)
    assert sum(evaluated) < once / 3  # (a chunk's 64 rows see 79 of the 300 slots)
    torch.testing.assert_close(dense_attend(q, k, v, mask), first, atol=1e-6, rtol=0)


def test_flex_buckets_are_few_and_waste_little():
    from longctx.attention.kernels import FLEX_BUCKETS, FLEX_MAX_STEP, flex_bucket

    per_octave = FLEX_BUCKETS.get()
    lengths = range(100, 70000, 7)
    buckets = [flex_bucket(n) for n in lengths]
    assert all(n <= b <= n * (1 + 1 / per_octave) for n, b in zip(lengths, buckets))
    assert all(flex_bucket(b) == b for b in buckets)  # a bucket is its own bucket: padding is done once
    assert buckets == sorted(buckets)
    octaves = {(b.bit_length(), b) for b in buckets}
    for k in {o for o, _ in octaves}:  # per octave [2^(k-1), 2^k): FLEX_BUCKETS, or one per FLEX_MAX_STEP tokens
        assert sum(1 for o, _ in octaves if o == k) <= max(per_octave, (1 << (k - 1)) // FLEX_MAX_STEP)
    assert all(b - n < FLEX_MAX_STEP for n, b in zip(lengths, buckets))
    assert [flex_bucket(1 << k) for k in range(7, 21)] == [1 << k for k in range(7, 21)]  # powers of two stay


@pytest.mark.parametrize("window,block", [(None, None), (50, None), (None, 40)])
def test_a_padded_mask_adds_slots_nothing_sees_and_that_see_nothing(window, block):
    kv_pos = torch.cat([torch.arange(150), torch.full((10,), -1)])
    mask = PositionMask(torch.arange(30, 150), kv_pos, window, block, 40 if block else 0)
    padded = mask.padded(128, 176)
    dense, big = mask.dense(), padded.dense()
    assert torch.equal(big[:120, :160], dense) and not big[120:].any() and not big[:, 160:].any()
    assert mask.padded(128, 176) is padded  # built once, shared by every layer
