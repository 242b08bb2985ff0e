"""HSR certified sparse decode (attention/hsr.py) against float64 attention: the certificate always holds."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention.dense import dense_attend
from longctx.attention.hsr import (
    HSRDecode,
    HSRResult,
    KeySummary,
    error_bound,
    hsr_attend,
    merge_certificates,
    score_bounds,
)
from longctx.attention.mask import PositionMask
from longctx.attention.merge import merge_partials

D = 32


def cache(kind: str, S: int = 1024, Hkv: int = 2, B: int = 1, seed: int = 0, filled: int | None = None):
    """Keys and values [B, Hkv, S, D] (float64) of a stated structure, and the slots' positions (-1: empty)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    if kind == "clustered":  # runs of 64 keys near one of 8 centres (text has topics), one planted key
        centres = torch.randn(8, D, generator=g, dtype=torch.float64) * 3
        k = (
            centres[torch.randint(0, 8, (B, Hkv, S // 64 + 1), generator=g)].repeat_interleave(64, dim=2)[:, :, :S]
            + 0.1 * k
        )
        k[:, :, S // 3] = 6.0
    elif kind == "outlier":  # one key of huge norm in an otherwise quiet block
        k = 0.1 * k
        k[:, :, 517] = 40.0
    elif kind == "equal":  # every score the same: nothing can be skipped cheaply
        k = torch.ones_like(k)
    elif kind == "huge":
        k = 30 * k
    n = S if filled is None else filled
    kv_pos = torch.where(torch.arange(S) < n, torch.arange(S), torch.tensor(-1))
    return k, v, kv_pos, n


def query(n_queries: int, Hq: int, B: int = 1, seed: int = 1, aligned: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n_queries, D, generator=g, dtype=torch.float64)
    return q.abs() + 1.0 if aligned else q


def assert_certified(q, k, v, mask, result, eps, slack=1e-6):
    """The true output and lse (float64 dense) lie within what the certificate allows (up to rounding, `slack`)."""
    want, want_lse = dense_attend(q, k, v, mask, return_lse=True)
    visible = mask.dense()  # [T, S]
    g = q.shape[1] // k.shape[1]
    vv = v.repeat_interleave(g, dim=1)[:, :, None].expand(-1, -1, q.shape[2], -1, -1)  # [B, Hq, T, S, D]
    seen = visible[None, None, :, :, None]
    v_range = torch.where(seen, vv, -math.inf).amax(3) - torch.where(seen, vv, math.inf).amin(3)
    assert ((want - result.out).abs() <= error_bound(result.certificate, v_range) + slack).all()
    gap = want_lse - result.lse
    assert (gap >= -slack).all() and (gap <= torch.log1p(result.certificate) + slack).all()
    everything = bool((result.blocks_read == result.blocks_visible).all())
    assert everything or (result.certificate <= eps).all()


CASES = [
    ("random", dict(), 1, 0.05, None),
    ("clustered", dict(), 1, 0.01, None),
    ("outlier", dict(), 1, 1e-3, None),
    ("equal", dict(), 1, 0.1, None),
    ("huge", dict(), 1, 1e-4, None),
    ("random", dict(filled=700), 1, 0.02, None),  # empty and partly filled blocks
    ("clustered", dict(), 2, 0.01, 200),  # two queries, a sliding window
    ("random", dict(B=2, Hkv=1), 1, 0.05, None),
]


@pytest.mark.parametrize("kind,shape,n_queries,eps,window", CASES)
def test_certificate_bounds_the_true_error(kind, shape, n_queries, eps, window):
    k, v, kv_pos, n = cache(kind, **shape)
    B, Hkv = k.shape[:2]
    q = query(n_queries, 4 * Hkv, B=B, aligned=kind == "clustered")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # laid out as the model hands it over: [B, T, H, D] transposed
    mask = PositionMask(torch.arange(n, n + n_queries) - (n_queries - 1), kv_pos, window)
    summary = KeySummary.of(k, kv_pos, 32)
    result = hsr_attend(q, k, v, mask, summary, eps, sink=32, recent=64)
    assert_certified(q, k, v, mask, result, eps)


def test_structured_keys_are_read_sparsely():
    k, v, kv_pos, n = cache("clustered", S=4096)
    q = query(1, 8, aligned=True)
    mask = PositionMask(torch.tensor([n]), kv_pos)
    result = hsr_attend(q, k, v, mask, KeySummary.of(k, kv_pos, 64), 1e-3, sink=64, recent=64)
    assert_certified(q, k, v, mask, result, 1e-3)
    assert (result.blocks_read < result.blocks_visible / 4).all()  # most of the cache is never read


def test_equal_scores_force_reading_everything():
    k, v, kv_pos, n = cache("equal")
    q = query(1, 8)
    result = hsr_attend(
        q, k, v, PositionMask(torch.tensor([n]), kv_pos), KeySummary.of(k, kv_pos, 32), 0.01, sink=32, recent=32
    )
    assert (result.blocks_read == result.blocks_visible).all() and (result.certificate == 0).all()


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.5])
@pytest.mark.parametrize("blocks", [1, 1000, 2**26])
def test_the_top_bins_hold_no_weight_a_selection_could_leave_unread(eps, blocks):
    """A weight at or above 2^(low + BINS - 1) exceeds eps alone, so it is read at any cut: more bins above it would
    change no selection (up to 2^26 blocks per head)."""
    from longctx.attention.hsr import BINS, _low

    assert 2.0 ** (_low(eps, blocks) + BINS - 1) > eps


def test_bounds_hold_for_every_key():
    k, v, kv_pos, _ = cache("random", filled=900)
    q = query(3, 8)
    summary = KeySummary.of(k, kv_pos, 64)
    u = score_bounds(q, summary)  # [B, Hq, T, blocks]
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(4, dim=1)) * D**-0.5
    per_slot = u[..., torch.arange(k.shape[2]) // 64]
    assert (scores[..., kv_pos >= 0] <= per_slot[..., kv_pos >= 0] + 1e-9).all()


def test_summary_kept_as_tokens_arrive_equals_the_whole_cache():
    k, _, kv_pos, n = cache("random", S=512, filled=300)
    kept = KeySummary.empty(1, 2, 512, D, 32, dtype=torch.float64)
    for start in range(0, n, 37):  # appended in uneven pieces, as phase 1 and decode steps write them
        slots = torch.arange(start, min(start + 37, n))
        kept.update(slots, k[:, :, slots], slots)
    whole = KeySummary.of(k, kv_pos, 32)
    for name in ("kmin", "kmax", "count", "pmin", "pmax"):
        assert torch.equal(getattr(kept, name), getattr(whole, name)), name


def test_certificates_compose_over_ranks():
    k, v, kv_pos, n = cache("clustered", S=2048)
    q = query(1, 8, aligned=True)
    mask = PositionMask(torch.tensor([n]), kv_pos)
    parts = []
    for rank_slots in (slice(0, 1024), slice(1024, 2048)):  # each rank holds half the cache and its summary
        kr, vr, pr = k[:, :, rank_slots], v[:, :, rank_slots], kv_pos[rank_slots]
        parts.append(
            hsr_attend(q, kr, vr, PositionMask(mask.q_pos, pr), KeySummary.of(kr, pr, 32), 0.01, sink=32, recent=32)
        )
    out, lse = merge_partials(torch.stack([p.out for p in parts]), torch.stack([p.lse for p in parts]))
    cert = merge_certificates(torch.stack([p.lse for p in parts]), torch.stack([p.certificate for p in parts]))
    merged = HSRResult(out.double(), lse.double(), cert, parts[0].blocks_read + parts[1].blocks_read, 0)
    assert_certified(q, k, v, mask, merged, 1.0, slack=1e-5)  # (the merge itself runs in fp32)
    assert merged.certificate.max() <= 0.01


@pytest.mark.parametrize("eps,block,match", [(0.0, 32, "HSR's eps"), (1.0, 32, "HSR's eps"), (0.1, 48, "power of two")])
def test_bad_settings_are_refused(eps, block, match):
    k, v, kv_pos, n = cache("random", S=1024)
    with pytest.raises(ValueError, match=match):
        hsr_attend(query(1, 8), k, v, PositionMask(torch.tensor([n]), kv_pos), KeySummary.of(k, kv_pos, block), eps)


def test_certificate_holds_for_a_bf16_cache():
    k, v, kv_pos, n = cache("clustered", S=1024)
    k, v, q = k.bfloat16(), v.bfloat16(), query(1, 8, aligned=True).bfloat16()
    mask = PositionMask(torch.tensor([n]), kv_pos)
    result = hsr_attend(q, k, v, mask, KeySummary.of(k, kv_pos, 32), 1e-3, sink=32, recent=32)
    as64 = HSRResult(
        result.out.double(), result.lse.double(), result.certificate.double(), result.blocks_read, result.blocks_visible
    )
    assert_certified(q.double(), k.double(), v.double(), mask, as64, 1e-3, slack=2e-2)  # bf16 rounding of the output


@pytest.mark.parametrize("tokens", [1, 3])
def test_spread_heads_read_everything_after_two_spread_selections_and_select_again_every_probe(tokens):
    """The state rule of `next_dense_until`, walked through steps of `tokens` query tokens: one spread selection is
    not enough, two are; the run of dense steps (PROBE_EVERY - 1 of them) ends in a selection that goes straight
    back if spread, and to selecting if not."""
    from longctx.attention.hsr import PROBE_EVERY, next_dense_until, reads_everything

    def walk(spread_at: list[bool]) -> list[bool]:
        """Whether each step read everything without selecting."""
        state, dense_at = torch.zeros(1, 1, dtype=torch.int32), []
        for step, spread in enumerate(spread_at):
            last = torch.tensor(1000 + tokens * (step + 1) - 1)
            dense = bool(reads_everything(state, last))
            read = torch.tensor([[10 if dense or spread else 1]])
            state = next_dense_until(state, read, torch.tensor(10), last, tokens)
            dense_at.append(dense)
        return dense_at

    assert not any(walk([True, False] * 10))  # now and then spread: always selects
    run = walk([True] * (2 * PROBE_EVERY + 2))
    assert run == [False, False] + [True] * (PROBE_EVERY - 1) + [False] + [True] * (PROBE_EVERY - 1) + [False]
    after = walk([True, True] + [False] * (PROBE_EVERY + 1))  # (the dense run ignores what it reads)
    assert after[-3:] == [True, False, False]


def test_a_head_told_to_read_everything_answers_exactly():
    """A step of heads in their dense run reads every visible block: float64 attention, certificate 0."""
    k, v, kv_pos, n = cache("clustered", S=4096)
    q = query(1, 8, aligned=True)
    mask = PositionMask(torch.tensor([n]), kv_pos)
    summary = KeySummary.of(k, kv_pos, 64)
    sparse = hsr_attend(q, k, v, mask, summary, 1e-3, sink=64, recent=64)
    assert (sparse.blocks_read < sparse.blocks_visible / 4).all()
    summary.dense_until.fill_(n + 3)
    every = hsr_attend(q, k, v, mask, summary, 1e-3, sink=64, recent=64)
    want, want_lse = dense_attend(q, k, v, mask, return_lse=True)
    assert (every.blocks_read == every.blocks_visible).all() and (every.certificate == 0).all()
    assert torch.allclose(every.out, want, atol=1e-12) and torch.allclose(every.lse, want_lse, atol=1e-12)
    assert (summary.dense_until == n + 3).all()  # (a step of the run leaves the state)


def test_stats_accumulate_what_the_steps_return():
    """`stats` adds up each step's blocks read and visible (per KV head) and keeps the largest certificate."""
    k, v, kv_pos, n = cache("clustered", S=2048)
    summary, stats, results = KeySummary.of(k, kv_pos, 64), torch.zeros(3, dtype=torch.float64), []
    for step in range(3):
        q = query(1, 8, aligned=step != 1)
        results.append(
            hsr_attend(q, k, v, PositionMask(torch.tensor([n + step]), kv_pos), summary, 1e-3, 64, 64, stats)
        )
    assert stats[0] == sum(int(r.blocks_read.sum()) for r in results)
    assert stats[1] == sum(int(r.blocks_visible) * r.blocks_read.numel() for r in results)
    assert stats[2] == max(float(r.certificate.max()) for r in results) > 0


# --- as the decode option of the strategies


def _tiny(family: str = "llama3", strategy=None):
    from longctx.models import random_model
    from tests.helpers import family_args

    return random_model(family_args(family), dtype=torch.float32, attention=strategy, seed=3)


def _decode_logits(model, strategy, prompt, steps):
    """Logits of `steps` greedy decode steps after `prompt`, with `strategy` on this model."""
    model.attention = strategy
    model.setup_cache(1, len(prompt) + steps, summarize=strategy.summarize)
    out = []
    with torch.inference_mode():
        strategy.set_phase("context")
        model(torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1), last_only=True)
        strategy.set_phase("query")
        logits = model(torch.tensor([prompt[-1:]]), torch.tensor([len(prompt) - 1]))
        for pos in range(len(prompt), len(prompt) + steps):
            out.append(logits[0, -1])
            logits = model(logits[0, -1].argmax().view(1, 1), torch.tensor([pos]))
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_hsr_decode_of_global_matches_dense_within_its_certificate(family):
    from longctx import attention

    model = _tiny(family)
    prompt = [(7 * i) % 96 for i in range(700)]
    dense = _decode_logits(model, attention.build("global"), prompt, 6)
    hsr = attention.build("global", decode=HSRDecode(eps=1e-4, block=32, sink=32, recent=32))
    sparse = _decode_logits(model, hsr, prompt, 6)
    report = hsr.decode_report()
    assert report["hsr_max_certificate"] <= 1e-4 and 0 < report["hsr_blocks_read_share"] <= 1
    assert torch.allclose(sparse, dense, atol=1e-2, rtol=0)
    for layer in model.cache.layers:  # the summaries kept while writing equal those of the final cache
        whole = KeySummary.of(layer.k, model.cache.positions, 32)
        assert torch.equal(layer.summary.kmax, whole.kmax) and torch.equal(layer.summary.count, whole.count)


def _star_hsr_rank(rank, world, decode):
    from longctx import attention
    from longctx.models import generate_tokens

    method = attention.build_decode(
        {"name": decode} | ({"eps": 1e-4, "block": 32, "sink": 32, "recent": 32} if decode == "hsr" else {})
    )
    strategy = attention.build("star", block_size=150, decode=method)
    model = _tiny(strategy=strategy)
    tokens = list(generate_tokens(model, [(5 * i) % 96 for i in range(600)], 8))
    return {"tokens": tokens, "report": strategy.decode_report()}


def test_hsr_decode_over_star_ranks_composes():
    from tests.distributed import run_ranks

    dense = run_ranks(2, _star_hsr_rank, "dense")
    sparse = run_ranks(2, _star_hsr_rank, "hsr")
    assert sparse[0]["tokens"] == sparse[1]["tokens"] == dense[0]["tokens"]
    report = sparse[0]["report"]
    assert report == sparse[1]["report"]  # the composed figures, the same on every rank
    assert report["hsr_max_certificate"] <= 1e-4
    # (random weights attend nearly uniformly, so little can be skipped here; test_structured_keys_are_read_sparsely
    # shows the skipping)


def test_structure_tool_measures_the_floor_any_certificate_needs():
    """tools/hsr_structure.py: the oracle never reads more than hsr, the certificate holds, and structured keys need
    few blocks while equal scores need them all."""
    from longctx.tools.hsr_structure import _oracle_blocks, measure

    rows = {}
    for kind in ("clustered", "equal"):
        k, v, kv_pos, n = cache(kind, S=2048)
        q = query(1, 8, aligned=True)
        mask = PositionMask(torch.tensor([n]), kv_pos)
        rows[kind] = measure([(q, k, v, mask)], kv_pos, 64, 1e-3, sink=64, recent=64)
        assert rows[kind]["certificate_holds"] and rows[kind]["oracle_share"] <= rows[kind]["hsr_share"]
    assert rows["clustered"]["oracle_share"] < 0.25 and rows["equal"]["oracle_share"] == 1.0
    # the floor is exact: with one block holding all but a sliver of the mass, that block (and the always-read
    # ones) suffice, and with eps below the sliver one more block is needed
    scores = torch.full((1, 256), -30.0, dtype=torch.float64)
    scores[0, 64:128] = 0.0
    always = torch.zeros(4, dtype=torch.bool)
    assert _oracle_blocks(scores, 64, 1e-3, always) == 1
    assert _oracle_blocks(scores, 64, 1e-20, always) == 4


SPARSE_KERNEL_CHECK = """
import torch
from longctx.attention import hsr, hsr_triton, lean, lean_triton
from longctx.attention.mask import PositionMask
from longctx.attention.quant import FP8, INT8, dequantize, from_stored_frame, quantize, tile_values, to_stored_frame

torch.manual_seed(0)
cases = 0
for B, Hkv, g, T, S, block, window, filled, kind in [(1, 2, 4, 1, 1000, 16, None, 950, "clustered"),
                                                      (2, 1, 2, 2, 300, 16, 100, 300, "random"),
                                                      (1, 2, 2, 1, 700, 32, None, 700, "equal")]:
    D = 32
    q = torch.randn(B, Hkv * g, T, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    if kind == "clustered":  # runs of 16 keys near one of 8 centres, the queries near the first
        centres = torch.randn(8, D) * 2
        k = centres[torch.randint(0, 8, (B, Hkv, S // 16 + 1))].repeat_interleave(16, 2)[:, :, :S] + 0.2 * k
        q = centres[0] + 0.2 * q
    elif kind == "equal":
        k = torch.ones_like(k)
    kv_pos = torch.where(torch.arange(S) < filled, torch.arange(S), -1)
    mask = PositionMask(torch.arange(filled - T, filled), kv_pos, window)
    summary = hsr.KeySummary.of(k, kv_pos, block)
    nb = summary.count.numel()
    # the Lean walk over random tile lists: some heads, all blocks, none, fewer blocks than programs; the combine
    # merging 4 partials per step
    lean_triton.COMBINE_CHUNK = 4 if kind == "clustered" else 32
    for n in (torch.randint(1, nb + 1, (B * Hkv,)), torch.full((B * Hkv,), nb), torch.zeros(B * Hkv, dtype=torch.long),
              torch.randint(0, 4, (B * Hkv,))):
        order = torch.stack([torch.randperm(nb) for _ in range(B * Hkv)])
        chosen = torch.zeros(B * Hkv, nb, dtype=torch.bool).scatter_(1, order, torch.arange(nb) < n[:, None])
        want_o, want_l = hsr.attend_blocks(q, k, v, mask, chosen.view(B, Hkv, nb), block)
        got_o, got_l = lean.lean_sparse_attend(q, k, v, mask, order.int(), n.int(), block)
        seen = want_l.isfinite()
        assert torch.equal(got_l.isfinite(), seen)
        assert torch.allclose(got_l[seen], want_l[seen], atol=1e-4) and torch.allclose(got_o, want_o.masked_fill(~seen[..., None], 0), atol=1e-4)
        # over one-byte codes (values in tiles, as a cache keeps them): each tile's scales, loaded a tile ahead of it,
        # are its own, in any order of tiles
        (k8, ke), (v8, ve) = quantize(k, FP8), quantize(v, FP8)
        want_o, want_l = hsr.attend_blocks(q, k8, v8, mask, chosen.view(B, Hkv, nb), block, scales=(ke, ve))
        got_o, got_l = lean.lean_sparse_attend(q, k8, tile_values(v8), mask, order.int(), n.int(), block, scales=(ke, ve))
        assert torch.equal(got_l.isfinite(), seen)
        assert torch.allclose(got_l[seen], want_l[seen], atol=1e-4) and torch.allclose(got_o, want_o.masked_fill(~seen[..., None], 0), atol=1e-4)
        cases += 2
    # the whole step: the same blocks read, output, lse and certificate as the PyTorch path; also with small chunks,
    # so that every kernel's work on a head is spread over several programs (and the always-read blocks over two,
    # several each, and several steps of bounds per program); in one launch (`_select`) and in three
    for eps, (hsr_triton.BLOCK_B, hsr_triton.CHUNK, hsr_triton.ALWAYS, hsr_triton.BOUNDS_PROGRAMS, select_alone) in (
            (1e-3, (64, 512, 8, 1024, 0)), (0.1, (64, 512, 8, 1024, 512)), (1e-3, (16, 32, 2, 2, 0)), (1e-3, (16, 32, 2, 2, 512))):
        # three steps from every other head reading all blocks: heads of both kinds in a step, and the state's rule
        summary.dense_until.zero_()
        summary.dense_until.view(-1)[::2] = filled + 1
        want_stats, got_stats = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for step in range(3):
            step_mask = PositionMask(mask.q_pos + step * T, kv_pos, window)  # (positions advance; the cache stays)
            start = summary.dense_until.clone()
            want = hsr.hsr_attend(q, k, v, step_mask, summary, eps, sink=16, recent=32, stats=want_stats)
            after = summary.dense_until.clone()
            summary.dense_until.copy_(start)
            with hsr_triton.SELECT_ALONE.scoped(select_alone):
                got = hsr._triton_attend(q, k, v, step_mask, summary, eps, 16, 32, hsr._low(eps, nb), got_stats)
            assert torch.equal(got_stats[:2], want_stats[:2]) and torch.allclose(got_stats[2], want_stats[2], rtol=1e-3, atol=1e-9), (got_stats, want_stats)
            assert torch.equal(summary.dense_until, after), (summary.dense_until, after)
            assert not summary.arrived.any()  # (`_select`'s count, back to 0)
            read = got.blocks_read.long()
            assert torch.equal(read, want.blocks_read) and int(got.blocks_visible) == int(want.blocks_visible), (read, want.blocks_read)
            assert torch.allclose(got.out, want.out, atol=1e-4) and torch.allclose(got.lse, want.lse, atol=1e-4)
            assert torch.allclose(got.certificate, want.certificate.float(), rtol=1e-3, atol=1e-9)
            print(kind, eps, "read", read.tolist(), "of", int(got.blocks_visible), "dense until", start.tolist(), "->", after.tolist())
            cases += 1
    if T > 1:  # query tokens in separate launches (as when fewer rows fit): the certificate from the joined lse
        tiles = torch.arange(nb, dtype=torch.int32).expand(B * Hkv, nb).contiguous()
        n = torch.full((B * Hkv,), nb, dtype=torch.int32)
        L, unread = torch.randn(B * Hkv, 16), torch.rand(B * Hkv) * (torch.arange(B * Hkv) > 0)
        worst = torch.zeros(2, dtype=torch.float64)  # (the largest certificate, raised by each path)
        whole = lean.lean_sparse_attend(q, k, v, mask, tiles, n, block, certify=(L, unread), worst=worst[:1].view(torch.int64))
        lean._ROWS[lean._rows_key(q, k)] = g
        split = lean.lean_sparse_attend(q, k, v, mask, tiles, n, block, certify=(L, unread), worst=worst[1:].view(torch.int64))
        del lean._ROWS[lean._rows_key(q, k)]
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(split, whole))
        assert torch.allclose(worst, whole[2].max().double(), rtol=1e-5)
        assert (whole[2][0] == 0).all() and (whole[2][1:] > 0).all()
        cases += 1
    # the step over one-byte keys and values: the kernels read them with their scales, as the PyTorch path does
    for one_byte in (FP8, INT8):
        (k8, ke), (v8, ve) = quantize(k, one_byte), quantize(v, one_byte)
        stored = hsr.KeySummary.of(dequantize(k8, ke, torch.float32), kv_pos, block)
        want = hsr.hsr_attend(q, k8, v8, mask, stored, 1e-3, sink=16, recent=32, scales=(ke, ve))
        stored.dense_until.zero_()
        # (the kernels read the stored frame: the queries rotated to it, the output back)
        got = hsr._triton_attend(to_stored_frame(q), k8, tile_values(v8), mask, stored, 1e-3, 16, 32, hsr._low(1e-3, nb), None, (ke, ve))
        assert torch.equal(got.blocks_read.long(), want.blocks_read)
        assert torch.allclose(from_stored_frame(got.out), want.out, atol=1e-4) and torch.allclose(got.lse, want.lse, atol=1e-4)
        cases += 1
# a decode step's summary update in one kernel equals the scatters: keys in a block already filled, several in one
# block, in a new one (fp32: the interpreter's bf16 is not the GPU's; tools/check_cuda.py compares bf16 there)
keys = torch.randn(2, 3, 80, 32)
got, want = (hsr.KeySummary.empty(2, 3, 80, 32, 16) for _ in range(2))
for summary in (got, want):
    summary.scatter(torch.arange(20), keys[:, :, :20], torch.arange(20) + 100)
slots = torch.tensor([20, 21, 37, 5])
hsr_triton.update_summary(got, slots, keys[:, :, slots], slots + 100)
want.scatter(slots, keys[:, :, slots], slots + 100)
for name in ("kmin", "kmax", "count", "pmin", "pmax"):
    assert torch.equal(getattr(got, name), getattr(want, name)), name
cases += 1
print("sparse kernels ok", cases)
"""


def test_sparse_kernels_equal_the_reference_in_the_interpreter():
    """The CUDA kernels run by Triton's CPU interpreter against the PyTorch path: the Lean walk over random tile lists
    (all blocks, none), and the whole step (bounds, selection, reads, certificate) on clustered, random and equal
    keys, with a window, partly filled blocks, batch 2."""
    from tests.helpers import run_in_interpreter

    assert "sparse kernels ok 68" in run_in_interpreter(SPARSE_KERNEL_CHECK)
