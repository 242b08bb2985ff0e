"""Lean Attention decode: the stream-K work split and its partial merge, against float64 dense attention."""

from __future__ import annotations

import collections

import pytest
import torch

from attention.kernels import PositionMask
from attention.lean import lean_reference, lean_schedule
from tests.test_kernels import reference


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


def test_a_share_spans_head_boundaries():
    segments = lean_schedule(heads=4, tiles=10, programs=3)  # 40 units: shares of 13, 13, 14
    assert [(s.program, s.head, s.tiles) for s in segments] == [
        (0, 0, (0, 10)), (0, 1, (0, 3)), (1, 1, (3, 10)), (1, 2, (0, 6)), (2, 2, (6, 10)), (2, 3, (0, 10)),
    ]  # fmt: skip


CASES = {
    "decode": (torch.tensor([299]), torch.arange(300), None),
    "window": (torch.tensor([299]), torch.arange(300), 50),
    "phase2 queries over a sparse cache": (torch.arange(500, 503), torch.cat([torch.arange(0, 400, 2), torch.full((37,), -1)]), None),
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
