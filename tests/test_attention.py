"""Attention strategies: the merge primitive, global, ring and star, on one rank and on 2 and 4 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch

from longctx import attention, models
from longctx.attention.dense import dense_attend
from longctx.attention.mask import PositionMask
from longctx.attention.merge import merge_into, merge_partials
from longctx.attention.ring import zigzag_shards
from longctx.models.generate import generate_tokens
from tests.distributed import run_ranks
from tests.helpers import reference, star_reference

N_CTX, N_QUERY, N_NEW = 37, 5, 6  # 37: not divisible by 2, 4 or the 2N zig-zag chunks


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


# --- the merge primitive


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_merging_random_splits_equals_dense_attention(parts):
    g = torch.Generator().manual_seed(parts)
    S, T = 40, 6
    q, k, v = (
        torch.randn(2, 4, T, 8, generator=g),
        torch.randn(2, 2, S, 8, generator=g) * 3,
        torch.randn(2, 2, S, 8, generator=g),
    )
    q_pos, kv_pos = torch.tensor([3, 9, 15, 22, 30, 39]), torch.arange(S)
    cuts = sorted(torch.randperm(S - 1, generator=g)[: parts - 1].add(1).tolist())
    outs, lses = [], []
    for a, b in zip([0, *cuts], [*cuts, S]):
        o, l = dense_attend(q, k[:, :, a:b], v[:, :, a:b], PositionMask(q_pos, kv_pos[a:b]), return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    ref_out, ref_lse = reference(q, k, v, q_pos.tolist(), kv_pos.tolist(), None)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    # One partial at a time, in place, 4 query rows per chunk (the last chunk short), as ring steps merge
    running, running_lse = outs[0].float(), lses[0].float()
    for o, l in zip(outs[1:], lses[1:]):
        merge_into(running, running_lse, o, l, elements=4 * 2 * 4 * 8)
    torch.testing.assert_close(running, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(running_lse, lse, atol=1e-6, rtol=0)


def test_merge_handles_parts_that_saw_nothing():
    out = torch.randn(3, 2, 4)  # 3 parts, 2 query rows; row 1 saw no key in any part
    lse = torch.tensor([[0.5, -math.inf], [-math.inf, -math.inf], [1e4, -math.inf]])  # huge lse: no overflow
    merged, total = merge_partials(out, lse)
    torch.testing.assert_close(merged[0], out[2, 0])  # exp(0.5 - 1e4) vanishes next to the huge part
    assert (merged[1] == 0).all() and torch.isinf(total[1]) and total[1] < 0
    assert torch.isfinite(merged).all() and total[0] == 1e4


# --- one rank


def _logits(model, tokens, positions):
    with torch.no_grad():
        return model(tokens[None], positions)[0]


def test_star_with_one_block_equals_global(hf_checkpoint):
    _, path = hf_checkpoint("llama3")
    tokens = _tokens(N_CTX)
    ref = _logits(models.load_model(path, dtype=torch.float32), tokens, torch.arange(N_CTX))
    star = models.load_model(path, dtype=torch.float32, attention=attention.build("star", block_size=64))
    torch.testing.assert_close(_logits(star, tokens, torch.arange(N_CTX)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,block,anchor", [("llama3", 8, 8), ("qwen2", 10, 4)])
def test_star_phase1_equals_explicit_anchor_block_sequences(family, block, anchor, hf_checkpoint):
    """The paper's phase 1, built independently: transformers in float64 on each [anchor; block] sequence.

    Without sliding windows: transformers measures a window in sequence indices, we in positions (see
    attention/README.md), and the two differ once the anchor is glued to a far-away block.
    """
    hf, path = hf_checkpoint(family, use_sliding_window=False) if family == "qwen2" else hf_checkpoint(family)
    hf64 = hf.double()
    tokens = _tokens(N_CTX, seed=1)
    star = models.load_model(
        path, dtype=torch.float32, attention=attention.build("star", block_size=block, anchor_size=anchor)
    )
    got = _logits(star, tokens, torch.arange(N_CTX))
    want = star_reference(hf64, tokens, block, anchor)
    hf.float()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    full = _logits(models.load_model(path, dtype=torch.float32), tokens, torch.arange(N_CTX))
    assert (got[block:] - full[block:]).abs().max() > 1e-2  # star really differs from global after block 0


def test_star_and_ring_on_one_rank_generate_through_the_phases(hf_checkpoint):
    _, path = hf_checkpoint("mistral")
    prompt = _tokens(N_CTX + N_QUERY, seed=2).tolist()
    ref = list(generate_tokens(models.load_model(path, dtype=torch.float32), prompt, N_NEW, context_len=N_CTX))
    ring = models.load_model(path, dtype=torch.float32, attention=attention.build("ring"))
    assert list(generate_tokens(ring, prompt, N_NEW, context_len=N_CTX)) == ref
    star = models.load_model(path, dtype=torch.float32, attention=attention.build("star", block_size=64))
    assert list(generate_tokens(star, prompt, N_NEW, context_len=N_CTX)) == ref


def test_zigzag_layout_balances_causal_work():
    shards = zigzag_shards(1000, 4)
    assert sorted(torch.cat(shards).tolist()) == list(range(1000))
    work = [int((s + 1).sum()) for s in shards]  # a causal query at position p sees p + 1 keys
    assert max(work) / min(work) < 1.01
    contiguous = [int((torch.arange(i * 250, (i + 1) * 250) + 1).sum()) for i in range(4)]
    assert max(contiguous) / min(contiguous) > 5


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="block_size must be a whole number >= 1"):
        attention.build("star", block_size=0)
    with pytest.raises(ValueError, match="anchor_size=16 is larger than block_size=8"):
        attention.build("star", block_size=8, anchor_size=16)
    with pytest.raises(ValueError, match="anchor_size must be a whole number >= 1"):
        attention.build("star", block_size=8, anchor_size=0)
    with pytest.raises(ValueError, match="anchor_mode"):
        attention.build("star", block_size=8, anchor_mode="copy")
    with pytest.raises(ValueError, match="unknown attention 'flash'.*global, ring, star"):
        attention.build("flash")
    star = attention.build("star", block_size=16)
    star.world = 4  # as if on four ranks
    with pytest.raises(ValueError, match="4 ranks but the context of 40 tokens has only 3 blocks"):
        star.context_indices(40)


@pytest.mark.parametrize(
    "n_ctx,world,block,anchor,chunk,mode",
    [
        (32704, 1, 8176, 8176, 8192, "broadcast"),  # a chunk a little longer than a block: one block per pass
        (32704, 1, 8176, 8176, 4096, "broadcast"),  # shorter: each block in equal halves
        (1000, 1, 256, 256, 600, "broadcast"),  # two whole blocks per pass
        (1000, 3, 256, 256, 100, "broadcast"),  # the first rank sends the anchor whole in its first pass
        (1000, 3, 256, 200, 150, "broadcast"),
        (1000, 2, 256, 100, 600, "recompute"),  # the anchor in front of a rank's own blocks, in one pass
        (999, 1, 250, 100, 7, "recompute"),
    ],
)
def test_star_passes_never_cut_across_a_block(n_ctx, world, block, anchor, chunk, mode):
    counts = set()
    for rank in range(world):
        star = attention.build("star", block_size=block, anchor_size=anchor, anchor_mode=mode).at(rank, world)
        star.chunk = chunk
        passes = star.context_passes(n_ctx)
        fed = [p for p in passes if p is not None]
        assert torch.equal(torch.cat(fed), star.context_indices(n_ctx))  # every token once, in order
        assert all(len(p) <= star.pass_tokens(n_ctx) for p in fed)
        for p in fed:  # within one block, or whole blocks of the rank's tokens
            blocks = (p // block).unique()
            whole = [int((star.context_indices(n_ctx) // block == b).sum()) for b in blocks]
            assert len(blocks) == 1 or int((p // block == blocks[0]).sum()) + sum(whole[1:]) == len(p) == sum(whole)
        if rank == 0 and world > 1 and mode == "broadcast":
            assert len(passes[0]) >= anchor
        if mode == "broadcast":
            counts.add(len(passes))
    assert len(counts) <= 1  # as many passes on every rank, in broadcast mode


# --- several ranks (gloo)


def _ring_worker(rank, world, paths):
    results = {}
    for name, path in paths.items():
        tokens = _tokens(N_CTX)
        model = models.load_model(path, dtype=torch.float32, attention=attention.build("ring"))
        idx = model.attention.context_indices(N_CTX)
        prompt = _tokens(N_CTX + N_QUERY, seed=2).tolist()
        results[name] = {
            "idx": idx,
            "logits": _logits(model, tokens[idx], idx),
            # every rank queues each step before reading its token (as on CUDA), against one rank reading first
            "generated": torch.tensor(list(generate_tokens(model, prompt, N_NEW, context_len=N_CTX, ahead=True))),
        }
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_global(world, hf_checkpoint):
    # GQA; a sliding window of 16; Gemma 3's sliding and full layers with their own ropes
    paths = {f: str(hf_checkpoint(f)[1]) for f in ("llama3", "mistral", "gemma3")}
    results = run_ranks(world, _ring_worker, paths)
    for name, path in paths.items():
        model = models.load_model(path, dtype=torch.float32)
        ref = _logits(model, _tokens(N_CTX), torch.arange(N_CTX))
        got = torch.empty_like(ref)
        for r in results:
            got[r[name]["idx"]] = r[name]["logits"]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        prompt = _tokens(N_CTX + N_QUERY, seed=2).tolist()
        want = list(generate_tokens(model, prompt, N_NEW, context_len=N_CTX))
        assert all(r[name]["generated"].tolist() == want for r in results)


def _star_worker(rank, world, path, block, anchor):
    out = {}
    prompt = _tokens(N_CTX + N_QUERY, seed=3).tolist()
    for mode in ("recompute", "broadcast"):
        strategy = attention.build("star", block_size=block, anchor_size=anchor, anchor_mode=mode)
        model = models.load_model(path, dtype=torch.float32, attention=strategy)
        idx = strategy.context_indices(N_CTX)
        tokens = torch.tensor(prompt)
        logits = _logits(model, tokens[idx], idx)[strategy.recomputes_anchor * anchor :]
        generated = torch.tensor(list(generate_tokens(model, prompt, N_NEW, context_len=N_CTX)))
        positions = model.cache.positions
        out[mode] = {
            "logits": logits,
            "own": torch.arange(*strategy.own_range(N_CTX)),
            "generated": generated,
            "kept": positions[positions >= 0],
            "slots": model.cache.capacity,
        }
    return out


@pytest.mark.parametrize("world,family", [(2, "qwen2"), (4, "qwen2"), (2, "gemma3")])
def test_star_multi_rank_equals_one_rank_with_the_same_blocks(world, family, hf_checkpoint):
    _, path = hf_checkpoint(family)
    block, anchor = 10, 6
    results = run_ranks(world, _star_worker, str(path), block, anchor)
    one = models.load_model(
        path, dtype=torch.float32, attention=attention.build("star", block_size=block, anchor_size=anchor)
    )
    prompt = _tokens(N_CTX + N_QUERY, seed=3).tolist()
    ref_logits = _logits(one, torch.tensor(prompt[:N_CTX]), torch.arange(N_CTX))
    ref_generated = list(generate_tokens(one, prompt, N_NEW, context_len=N_CTX))
    for mode in ("recompute", "broadcast"):  # (c) and (d): every mode on every rank count gives the same
        got = torch.cat([r[mode]["logits"] for r in results])
        torch.testing.assert_close(got, ref_logits, atol=1e-4, rtol=0)
        for rank, r in enumerate(results):
            assert r[mode]["generated"].tolist() == ref_generated
            # (f) each rank keeps its own blocks only; the last also keeps the query and generated tokens
            own = r[mode]["own"].tolist()
            tail = list(range(N_CTX, N_CTX + N_QUERY + N_NEW - 1)) if rank == world - 1 else []
            assert sorted(r[mode]["kept"].tolist()) == own + tail
            assert r[mode]["slots"] == len(own) + (N_QUERY + N_NEW if rank == world - 1 else 0)
    assert sorted(sum((r["broadcast"]["own"].tolist() for r in results), [])) == list(range(N_CTX))


def _phase2_worker(rank, world, shards, q, new_k, new_v):
    """Each rank holds a random KV shard; the query's own K/V goes to the last rank; returns the merged output."""
    args = models.ModelArgs(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=8)
    model = models.Transformer(args, attention.build("ring"))
    pos, k, v = shards[rank]
    cache = model.setup_cache(1, len(pos) + q.shape[2])
    cache.layers[0].write(cache.reserve(pos), k, v)
    strategy = model.attention
    strategy.set_phase("query")
    q_pos = torch.arange(100, 100 + q.shape[2])
    step = strategy.begin(cache, q_pos, {None})
    return strategy.attend(q, new_k, new_v, cache.layers[0], step, None)


@pytest.mark.parametrize("world", [2, 4])
def test_phase2_equals_dense_attention_over_all_ranks_kv(world):
    g = torch.Generator().manual_seed(world)
    perm = torch.randperm(100, generator=g)
    shards = []
    for r in range(world):  # disjoint, scattered positions; a shard per rank of uneven size
        pos = perm[r * 100 // world : (r + 1) * 100 // world].sort().values
        shards.append((pos, torch.randn(1, 2, len(pos), 4, generator=g), torch.randn(1, 2, len(pos), 4, generator=g)))
    q, new_k, new_v = (
        torch.randn(1, 4, 3, 4, generator=g),
        torch.randn(1, 2, 3, 4, generator=g),
        torch.randn(1, 2, 3, 4, generator=g),
    )
    outs = run_ranks(world, _phase2_worker, shards, q, new_k, new_v)
    all_pos = torch.cat([s[0] for s in shards] + [torch.arange(100, 103)])
    all_k = torch.cat([s[1] for s in shards] + [new_k], 2)
    all_v = torch.cat([s[2] for s in shards] + [new_v], 2)
    ref, _ = reference(q, all_k, all_v, list(range(100, 103)), all_pos.tolist(), None)
    for out in outs:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def _global_worker(rank, world):
    model = models.random_model(
        models.ModelArgs(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, intermediate_size=8),
        torch.float32,
        attention=attention.build("global"),
    )
    try:
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    except ValueError as e:
        return str(e)
    return ""


def test_global_on_two_ranks_is_refused():
    messages = run_ranks(2, _global_worker)
    assert all("runs on one rank" in m and "attention=ring" in m for m in messages)


# --- the real model


def _passkey_prompts(tok, count: int = 3):
    from longctx.tasks import demo_prompt

    prompts = []
    for seed, n in zip((0, 1, 3), (500, 750, 950)[:count]):  # seeds whose key SmolLM2 finds with global attention
        context, query, key = demo_prompt(tok, n, seed)
        ids, n_ctx = models.chat_prompt(tok, context, query)
        prompts.append((ids, n_ctx, key))
    return prompts


def _smollm2_worker(rank, world, path):
    model, tok = models.load(path, dtype=torch.float32, attention=attention.build("ring"))
    answers = {}
    for name in ("ring", "star"):
        for i, (ids, n_ctx, _) in enumerate(_passkey_prompts(tok)):
            params = {"block_size": -(-n_ctx // 4)} if name == "star" else {}
            model.attention = attention.build(name, **params)
            answers[f"{name}{i}"] = torch.tensor(list(generate_tokens(model, ids, 10, context_len=n_ctx)))
    return answers


def test_smollm2_star_and_ring_answer_like_global(smollm2_dir):
    model, tok = models.load(smollm2_dir, dtype=torch.float32)
    prompts = _passkey_prompts(tok)
    want = [list(generate_tokens(model, ids, 10, context_len=n_ctx)) for ids, n_ctx, _ in prompts]
    assert all(key in tok.decode(w) for w, (_, _, key) in zip(want, prompts))  # global finds each key
    results = run_ranks(2, _smollm2_worker, str(smollm2_dir))
    for r in results:
        for i in range(len(prompts)):
            assert r[f"ring{i}"].tolist() == want[i]
            assert r[f"star{i}"].tolist() == want[i]
