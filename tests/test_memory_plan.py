"""The memory plan (preflight.memory) against the bytes a run really allocates on CPU, and the runner's refusal."""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from longctx import attention
from longctx.attention.quant import FP8
from longctx.models import generate_tokens, random_model
from longctx.models.config import ModelArgs
from longctx.models.transformer import FeedForward
from longctx.preflight import memory
from longctx.preflight.memory import RunShape, plan_run
from tests.distributed import run_ranks
from tests.helpers import FAMILIES, REPO, family_args, run_runner
from tests.live_bytes import LiveBytes

# The plan may overshoot what is allocated (it is what a run is refused on), but by little; it must not fall short.
OVER, UNDER = 0.10, 0.05


def _strategy(name: str, params: dict) -> attention.AttentionStrategy:
    """The strategy `name` with `params`, whose `decode` (a decode config node) gives its decode method, and
    `kv_dtype` and `chunk` its KV cache's dtype and phase-1 chunk."""
    params = dict(params)
    kv_dtype, chunk = params.pop("kv_dtype", None), params.pop("chunk", None)
    strategy = attention.build(name, decode=attention.build_decode(params.pop("decode", None)), **params)
    strategy.kv_dtype, strategy.chunk = kv_dtype, chunk
    return strategy


def measured_peak(rank: int, world: int, args: ModelArgs, name: str, params: dict, n: int, new: int, dtype) -> int:
    """Bytes live at once over building the model and one generation, on this rank."""
    torch.set_num_threads(1)
    with LiveBytes() as live:
        model = random_model(args, dtype=dtype, attention=_strategy(name, params))
        ids = [i % args.vocab_size for i in range(n)]
        list(generate_tokens(model, ids, new, context_len=n - 16, max_seq_len=n + new))
    return live.peak


def assert_plan_matches(args, name, params, world, n=1024, new=8, dtype=torch.float32):
    run = (args, name, params, n, new, dtype)
    peaks = run_ranks(world, measured_peak, *run) if world > 1 else [measured_peak(0, 1, *run)]
    plan = plan_run(args, _strategy(name, params), RunShape(n - 16, 16 + new, 16), world, dtype, "cpu")
    for r, peak in zip(plan.ranks, peaks):
        assert peak * (1 - UNDER) <= r.total <= peak * (1 + OVER), f"rank {r.rank}: planned {r.total}, allocated {peak}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_of_each_family_matches_allocation(family):
    assert_plan_matches(family_args(family), "global", {}, 1)


@pytest.mark.parametrize("params", [{"block_size": 256}, {"block_size": 200, "anchor_size": 64}])
def test_plan_of_star_on_one_rank(params):
    assert_plan_matches(family_args("llama3"), "star", params, 1)


@pytest.mark.parametrize("name", ["global", "star"])
def test_plan_of_sparse_decode_counts_its_summaries_and_workspace(name):
    # small blocks and many query tokens: the key summaries and the reference's bounds are the largest terms
    params = {"decode": {"name": "hsr", "block": 2, "sink": 2, "recent": 2}} | (
        {"block_size": 256} if name == "star" else {}
    )
    assert_plan_matches(family_args("llama3"), name, params, 1, n=512, new=64)


def test_plan_follows_the_mlp_chunks(monkeypatch):
    monkeypatch.setattr(FeedForward, "chunk", 256)
    assert_plan_matches(family_args("qwen3"), "global", {}, 1, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "family,name,params,world,dtype",
    [
        ("llama3", "star", {"block_size": 256}, 2, torch.float32),
        ("gemma3", "star", {"block_size": 256}, 2, torch.bfloat16),
        ("llama3", "star", {"block_size": 256, "anchor_mode": "recompute"}, 3, torch.float32),
        ("llama3", "ring", {}, 2, torch.float32),
        ("qwen3", "ring", {}, 3, torch.bfloat16),
    ],
)
def test_plan_of_each_rank_matches_allocation(family, name, params, world, dtype):
    assert_plan_matches(family_args(family), name, params, world, dtype=dtype)


@pytest.mark.parametrize(
    "name,params,world",
    [
        ("global", {"kv_dtype": FP8}, 1),
        ("global", {"chunk": 128}, 1),
        ("star", {"block_size": 256, "kv_dtype": FP8}, 1),
        ("star", {"block_size": 256, "kv_dtype": FP8}, 2),
        ("ring", {"kv_dtype": FP8}, 2),
        ("global", {"kv_dtype": FP8, "decode": {"name": "hsr", "block": 16, "sink": 16, "recent": 16}}, 1),
    ],
)
def test_plan_of_fp8_kv_and_chunks_matches_allocation(name, params, world):
    assert_plan_matches(family_args("llama3"), name, params, world)


FUSED_MASKS = {  # (query positions, key positions, star block): masks of several pieces on the fused kernels
    "star, 4 equal blocks": (torch.arange(1024), torch.arange(1024), 256),  # (star in one pass: the plan's largest)
    "star, a short last block": (torch.arange(1000), torch.arange(1000), 256),
    "a chunk over the cache": (torch.arange(512, 1024), torch.arange(1024), None),
    "ring's zig-zag chunks": (torch.cat([torch.arange(128), torch.arange(896, 1024)]), torch.arange(1024), None),
}
TIGHT = {"star, 4 equal blocks"}  # where the plan's fused term should be near what is held (elsewhere: at least it)


@pytest.mark.parametrize("mask", list(FUSED_MASKS))
def test_the_fused_pieces_hold_what_the_plan_counts(mask, monkeypatch):
    """attention.fused on CPU with the GPU's allocations (a kernel and the compiled merge that make only their results):
    what it holds beyond its inputs stays within the plan's term for it, and near it for star's blocks in one pass
    (the run whose plan that term decides)."""
    from longctx.attention import fused

    args = family_args("llama3")
    q_pos, kv_pos, block = FUSED_MASKS[mask]
    T, S, Hq, Hkv, D = len(q_pos), len(kv_pos), args.n_heads, args.n_kv_heads, args.head_dim
    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(0):
        pieces = fused.split(q_pos, kv_pos, None, block, block or 0)
    assert pieces is not None and len(pieces) > 1
    kernel = lambda q, k, v, causal: (torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape[:3]))  # noqa: E731
    monkeypatch.setattr(fused, "merge_pair", lambda o, l, *_: (torch.empty_like(o), torch.empty_like(l)))
    q = torch.zeros(2, Hq, T, D, dtype=torch.bfloat16)  # (a batch of 2: squares of one size are copies)
    k, v = (torch.zeros(2, Hkv, S, D, dtype=torch.bfloat16) for _ in range(2))
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}

    class Made(LiveBytes):  # views of the inputs are not memory made here
        def ignores(self, data_ptr: int) -> bool:
            return data_ptr in inputs

    with Made() as live:
        out = fused.fused_attend(q, k, v, pieces, kernel)
    del out
    planned = memory._kernel_workspace(args, T, S, 2, "cuda", None) * 2  # (a batch of 2)
    assert live.peak <= planned, (live.peak, planned)
    if mask in TIGHT:
        assert live.peak >= 0.8 * planned, (live.peak, planned)


def test_fp8_and_chunks_are_the_fixes_named_first():
    cfg = _cfg({"ctx": "512k"}, memory={"limit_gib": 80})
    fixes = memory.fits_with(cfg, 80 * memory.GiB)
    assert (
        fixes[0] == "kv.dtype=fp8"
        and memory.plan_config(OmegaConf.merge(cfg, {"kv": {"dtype": "fp8"}})).need <= 80 * memory.GiB
    )
    # a GPU that cannot compute with FP8 is offered int8, the other one-byte cache; one of them set, neither
    assert memory.fits_with(cfg, 80 * memory.GiB, fp8_ok=False)[0] == "kv.dtype=int8"
    assert not memory.fits_with(OmegaConf.merge(cfg, {"kv": {"dtype": "int8"}}), 80 * memory.GiB)[0].startswith("kv.")
    assert not any(f.startswith("kv.dtype=fp8 ") for f in fixes)  # both together only where neither alone fits
    # where only a smaller chunk fits: the largest such, named before more ranks
    cfg = _cfg(kv={"dtype": "fp8"}, ctx={"chunk": 65536})
    avail = (
        memory.plan_config(OmegaConf.merge(cfg, {"ctx": {"chunk": 32768}})).need + memory.plan_config(cfg).need
    ) // 2
    assert memory.fits_with(cfg, avail)[0] == "ctx.chunk=32768"


def test_an_unset_chunk_shrinks_to_the_largest_that_fits():
    cfg = _cfg(kv={"dtype": "fp8"}, ctx={"length": 921600}, memory={"limit_gib": 79})
    assert memory.plan_config(cfg).need > 79 * memory.GiB  # 64K tokens per pass would not fit
    plan = memory.check_fits(cfg, torch.device("cuda"))
    assert cfg.ctx.chunk in memory.CHUNKS and plan.need <= 79 * memory.GiB
    bigger = OmegaConf.merge(cfg, {"ctx": {"chunk": 2 * cfg.ctx.chunk}})
    assert memory.plan_config(bigger).need > 79 * memory.GiB


def test_a_new_cache_replaces_the_old_one_without_holding_both():
    args = family_args("llama3")
    model = random_model(args, dtype=torch.float32)
    with LiveBytes() as live:
        model.setup_cache(1, 4096)
        model.setup_cache(1, 4096)
    one_cache = args.n_layers * 2 * args.n_kv_heads * args.head_dim * 4096 * 4
    assert one_cache <= live.peak < 1.5 * one_cache


@pytest.mark.parametrize(
    "name,params",
    [
        ("global", {}),
        ("ring", {}),
        ("star", {"block_size": 100}),
        ("star", {"block_size": 100, "anchor_size": 30, "anchor_mode": "recompute"}),
    ],
)
def test_fed_tokens_count_the_context_indices_without_them(name, params):
    for world, n in ((1, 430), (2, 1001), (3, 430), (4, 1001)):
        for rank in range(world):
            s = attention.build(name, **params).at(rank, world)
            assert s.fed_tokens(n) == len(s.context_indices(n))


def test_a_plan_of_any_context_holds_no_tensor_of_its_length():
    from tests.helpers import compose_cfg

    for strategy in ("star", "ring"):
        cfg = compose_cfg(
            "task=plan", "model=llama3", f"attention={strategy}", "ctx.length=1000000000000", "parallel.nproc=4"
        )
        with LiveBytes() as live:
            plan = memory.plan_config(cfg)
        assert plan.shape.n_ctx > 10**11 and live.peak < 2**26  # (the meta-device model and small tables only)


def test_plan_terms_follow_each_strategys_layout():
    args = family_args("llama3")
    shape = RunShape(4096, 64)
    kv = lambda p: [r.terms["KV cache"] for r in p.ranks]  # noqa: E731
    one = plan_run(args, attention.build("global"), shape, 1, torch.bfloat16, "cuda")
    star = plan_run(args, attention.build("star", block_size=1024), shape, 4, torch.bfloat16, "cuda")
    ring = plan_run(args, attention.build("ring"), shape, 4, torch.bfloat16, "cuda")
    for p in (star, ring):  # a quarter of the context's KV each, the last rank also the 64 later tokens
        assert kv(p)[:3] == [pytest.approx(kv(one)[0] * 1024 / 4160, rel=1e-3)] * 3
        assert kv(p)[3] > kv(p)[0]
        assert all(r.terms["weights"] == one.ranks[0].terms["weights"] for r in p.ranks)
    assert "CUDA graph pool" in one.ranks[0].terms
    assert (
        "CUDA graph pool"
        not in plan_run(args, attention.build("global"), shape, 1, torch.bfloat16, "cpu").ranks[0].terms
    )


def _cfg(groups: dict | None = None, **over):
    base = OmegaConf.load(REPO / "conf" / "config.yaml")
    cfg = OmegaConf.create({k: v for k, v in base.items() if k not in ("defaults", "hydra")})
    chosen = {"model": "llama3", "attention": "star", "ctx": "1m", "parallel": "single", "task": "bench"} | (
        groups or {}
    )
    for group, name in chosen.items():
        cfg[group] = OmegaConf.merge(cfg.get(group) or {}, OmegaConf.load(REPO / "conf" / group / f"{name}.yaml"))
    cfg.device = "cuda"
    return OmegaConf.merge(cfg, over)


def test_what_fits_is_what_the_plan_says_fits():
    cfg = _cfg(memory={"limit_gib": 80})
    avail = 80 * memory.GiB
    assert memory.plan_config(cfg).need > avail
    fixes = memory.fits_with(cfg, avail)
    ranks = next(f for f in fixes if f.startswith("parallel.nproc="))
    n = int(ranks.split("=")[1])
    assert memory.plan_config(cfg, world=n).need <= avail < memory.plan_config(cfg, world=n // 2).need
    # the longest context, in the chunk an unset one shrinks to (`check_fits`); a little longer fits in none
    length = int(next(f for f in fixes if f.startswith("ctx.length=")).split("=")[1])
    memory.check_fits(OmegaConf.merge(cfg, {"ctx": {"length": length}}), torch.device("cuda"))
    smallest = OmegaConf.merge(cfg, {"ctx": {"chunk": memory.CHUNKS[-1]}})
    assert memory.plan_config(smallest, n_ctx=length + 16384).need > avail
    assert memory.plan_config(cfg, n_ctx=length).need > avail  # (the default chunk alone would name less)
    assert "dtype=bf16" not in fixes  # already bf16
    with pytest.raises(memory.DoesNotFit, match=r"needs \d+\.\d GiB per rank .* fits with .*parallel\.nproc=\d+ "):
        memory.check_fits(cfg, torch.device("cuda"))


def test_global_is_told_to_spread_over_ranks():
    fixes = memory.fits_with(_cfg({"attention": "global"}), 80 * memory.GiB)
    assert any(f.startswith("attention=star parallel.nproc=") for f in fixes)


def _runner(tmp_path, *overrides):
    return run_runner(tmp_path, *overrides, "wandb.mode=disabled", timeout=120)


def test_runner_refuses_a_run_that_does_not_fit_before_loading(tmp_path):
    res = _runner(tmp_path, "task=bench", "model=llama3", "ctx=128k", "device=cpu", "memory.limit_gib=40")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: memory: llama3 with star at") and "memory.limit_gib=40" in line and "fits with" in line
    )
    assert "Traceback" not in res.stderr and "random weights" not in res.stderr  # refused before building the model
    assert not (tmp_path / "run" / "results.json").exists()


def test_task_plan_prints_every_rank_without_loading(tmp_path):
    res = _runner(tmp_path, "task=plan", "model=llama3_70b", "ctx=1m", "parallel.nproc=8", "device=cuda")
    assert res.returncode == 0, res.stderr[-2000:]
    # ranks 1-6 plan alike; rank 0 receives no anchor (fewer keys for FlexAttention to pad), rank 7 keeps new tokens
    assert "star on 8 ranks" in res.stdout and "ranks 1-6" in res.stdout and "KV cache" in res.stdout
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(result["ranks"]) == 8 and result["need_bytes"] > result["peak_bytes"]


def test_cpu_ranks_that_share_the_host_are_told_how_many_fit(monkeypatch):
    from tests.helpers import compose_cfg

    monkeypatch.setattr(memory, "_host_available", lambda: 20 * memory.GiB)
    cfg = compose_cfg("model=smollm2", "attention=ring", "parallel.nproc=64", "device=cpu")
    with pytest.raises(memory.DoesNotFit, match=r"fits with parallel.nproc=(\d+)") as err:
        memory.check_fits(cfg, torch.device("cpu"))
    fewer = int(re.search(r"parallel.nproc=(\d+)", str(err.value)).group(1))
    assert 1 <= fewer < 64 and memory.plan_config(cfg, world=fewer).need <= 20 * memory.GiB // fewer
    assert memory.plan_config(cfg, world=fewer + 1).need > 20 * memory.GiB // (fewer + 1)
