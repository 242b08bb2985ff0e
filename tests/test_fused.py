"""The fused phase-1 path's logic on CPU: masks split into full and causal pieces, and the pieces' partials merged
(the CUDA kernel itself is checked by tools/check_cuda.py)."""

import pytest
import torch

from longctx.attention import fused
from longctx.attention.dense import dense_attend
from longctx.attention.fused import Piece, fused_attend, fused_kernel, split
from longctx.attention.mask import PositionMask
from longctx.attention.ring import zigzag_shards
from longctx.attention.star import StarAttention

ar = torch.arange


@pytest.fixture(autouse=True)
def merge_small_masks():
    """The layouts here are small: let masks of several pieces take the fused path at any length."""
    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(0):
        yield


def _covered(pieces: list[Piece], T: int, S: int) -> torch.Tensor:
    """How many pieces cover each (query, key) pair."""
    n = torch.zeros(T, S, dtype=torch.int32)
    for p in pieces:
        (r0, r1), (k0, k1) = p.rows, p.keys
        if not p.causal:
            n[r0:r1, k0:k1] += 1
            continue
        side = (r1 - r0) // p.count
        assert side * p.count == r1 - r0 == k1 - k0
        for i in range(p.count):
            a, b = r0 + i * side, k0 + i * side
            n[a : a + side, b : b + side] += torch.ones(side, side, dtype=torch.int32).tril()
    return n


def _star_masks(n_ctx: int, world: int, block: int, mode: str) -> list[PositionMask]:
    masks = []
    for r in range(world):
        s = StarAttention(block, anchor_mode=mode).at(r, world)
        pos = s.context_indices(n_ctx)
        kv = torch.cat([ar(s.anchor_size), pos]) if s.receives_anchor else pos
        masks.append(PositionMask(pos, kv, None, block, s.anchor_size))
    return masks


def _ring_masks(n_ctx: int, world: int) -> list[PositionMask]:
    shards = zigzag_shards(n_ctx, world)
    return [PositionMask(shards[r], shards[(r - s) % world]) for r in range(world) for s in range(world)]


CASES = {
    "global": [PositionMask(ar(300), ar(300))],
    "query over a cache with empty slots": [PositionMask(ar(500, 700), torch.cat([ar(700), torch.full((50,), -1)]))],
    "window wider than the context": [PositionMask(ar(300), ar(300), window=512)],
    "ring, 2 ranks": _ring_masks(301, 2),
    "ring, 3 ranks": _ring_masks(1000, 3),
    "star, 4 blocks on one rank": _star_masks(1000, 1, 256, "broadcast"),
    "star, 2 ranks, broadcast": _star_masks(1000, 2, 128, "broadcast"),
    "star, 3 ranks, recompute": _star_masks(1000, 3, 200, "recompute"),
    "star, anchor shorter than a block": [PositionMask(ar(900), ar(900), None, 300, 100)],
    "keys holding a position twice": [PositionMask(ar(10), torch.cat([ar(5), ar(5)]))],
    "queries before every key": [PositionMask(ar(0, 130), ar(200, 400))],
}


@pytest.mark.parametrize("case", CASES)
def test_pieces_cover_each_visible_pair_once(case):
    for mask in CASES[case]:
        pieces = split(mask.q_pos, mask.kv_pos, mask.window, mask.block_size, mask.anchor_size)
        assert pieces is not None
        covered = _covered(pieces, mask.q_pos.numel(), mask.kv_pos.numel())
        assert covered.max() <= 1, "a pair in two pieces would count twice in the merge"
        assert torch.equal(covered.bool(), mask.dense())
        assert fused._pairs(pieces) == int(mask.dense().sum())  # (what the keys-per-query rule counts)


def test_squares_of_one_size_batch_into_one_call():
    assert split(ar(1000), ar(1000), None, None, 0) == [Piece((0, 1000), (0, 1000), True)]
    # four blocks on one rank: blocks 1-3 against the anchor in one call, the four blocks' squares in two (the last
    # block is shorter)
    (mask,) = _star_masks(1000, 1, 256, "broadcast")
    assert mask.pieces() == [
        Piece((256, 1000), (0, 256), False),
        Piece((0, 768), (0, 768), True, 3),
        Piece((768, 1000), (768, 1000), True),
    ]
    # ring's diagonal step: both zig-zag chunks' squares in one call, the late chunk against the early one in another
    shard = zigzag_shards(400, 2)[0]
    assert PositionMask(shard, shard).pieces() == [
        Piece((100, 200), (0, 100), False),
        Piece((0, 200), (0, 200), True, 2),
    ]


def test_long_causal_runs_are_cut_into_batched_squares(monkeypatch):
    monkeypatch.setattr(fused, "MAX_CAUSAL_SQUARE", 256)
    mask = PositionMask(ar(1000), ar(1000))
    # four squares of 250 in one call, the full pieces below the diagonal in three
    assert sorted(mask.pieces(), key=lambda p: p.causal)[-1] == Piece((0, 1000), (0, 1000), True, 4)
    assert len(mask.pieces()) == 4
    assert torch.equal(_covered(mask.pieces(), 1000, 1000), mask.dense().int())


def test_masks_that_are_not_a_few_pieces_stay_on_flex():
    assert split(ar(2000), ar(2000), 512, None, 0) is None  # the window cuts
    assert split(ar(20000), ar(20000), None, 64, 64) is None  # too many blocks
    assert fused_kernel(torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 128, 64)) is None  # CPU
    (mask,) = _star_masks(999, 1, 256, "broadcast")
    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(1000):
        assert split(mask.q_pos, mask.kv_pos, None, 256, 256) is None  # short: merging would cost more than it gains
    assert split(ar(999), ar(999), None, None, 0) == [Piece((0, 999), (0, 999), True)]  # one piece: no merge


@pytest.mark.parametrize("block", [None, 65536])
def test_a_phase1_chunk_of_a_long_context_stays_fused_where_a_short_context_does_not(block):
    """The default rule: a chunk of a long context sees many keys per query (star: its anchor and the earlier part of
    its block; global: everything before it), enough to pay for the merges; star's four blocks of 2K tokens do not
    (figure `prefill`), while four of 4K do, as before the rule counted keys."""
    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(fused.FUSED_MIN_KEYS_PER_QUERY.default):
        q_pos = ar(3 * 65536 + 8192, 3 * 65536 + 12288)
        kv_pos = torch.cat([ar(q_pos[-1] + 1), torch.full((4096,), -1)])  # the cache so far, empty slots after it
        pieces = split(q_pos, kv_pos, None, block, 65536)
        assert pieces is not None and len(pieces) == (2 if block is None else 3)
        for side, merged in ((2048, False), (4096, True)):
            star = _star_masks(4 * side, 1, side, "broadcast")[0]
            assert (split(star.q_pos, star.kv_pos, None, side, side) is not None) == merged


def _reference_kernel(q, k, v, causal):
    """Float64 attention over one piece: the contract the CUDA kernel fulfils."""
    T, S = q.shape[2], k.shape[2]
    mask = PositionMask(ar(T), ar(T)) if causal else PositionMask(ar(S, S + T), ar(S))
    out, lse = dense_attend(q, k, v, mask, return_lse=True)
    return out, lse


@pytest.mark.parametrize("case", ["star, 4 blocks on one rank", "ring, 3 ranks", "star, 3 ranks, recompute", "global"])
def test_pieces_merged_equal_attention_over_the_whole_mask(case):
    g = torch.Generator().manual_seed(0)
    for mask in CASES[case]:
        T, S = mask.q_pos.numel(), mask.kv_pos.numel()
        q = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
        k, v = (torch.randn(2, 2, S, 16, generator=g, dtype=torch.float64) for _ in range(2))
        out, lse = fused_attend(q, k, v, mask.pieces(), _reference_kernel)
        ref, ref_lse = dense_attend(q, k, v, mask, return_lse=True)
        # the merge works in fp32
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse.to(lse.dtype), rtol=0, atol=1e-5)
