"""Tensor parallelism inside a host (parallel/tensor.py) and the hosts × tp layout (parallel/layout.py).

Every layout is checked against the one-rank model on tiny checkpoints of every family, on gloo ranks: the logits of
phase 1 and of the query, and greedy generation token for token.
"""

from __future__ import annotations

import pytest
import torch

from longctx import attention, models
from longctx.attention.quant import ONE_BYTE
from longctx.models.generate import generate_tokens
from longctx.parallel.tensor import TensorParallel, check_degree, local_args, valid_degrees
from tests.distributed import run_ranks
from tests.live_bytes import LiveBytes

N_CTX, N_QUERY, N_NEW = 37, 5, 6
BLOCK, ANCHOR = 10, 6
# Every family; a Llama with biases on o_proj and the MLP (added once, after the all-reduce); tied embeddings; Phi-3's
# fused checkpoint tensors, LongRoPE and rope on half of each head.
FAMILIES = {
    "phi3_longrope": {},
    "llama3": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma3": {},
    "llama_linear_tied": {},
    "llama3_biases": {"attention_bias": True, "mlp_bias": True},
}


def _path(hf_checkpoint, name: str) -> str:
    family = name.removesuffix("_biases")
    return str(hf_checkpoint(family, **FAMILIES[name])[1])


def _prompt() -> list[int]:
    return torch.randint(0, 96, (N_CTX + N_QUERY,), generator=torch.Generator().manual_seed(5)).tolist()


def _strategy(kind: str, group=None) -> attention.AttentionStrategy:
    """`kind`: global, ring, star-broadcast or star-recompute, with `-fp8` or `-int8` for a KV cache in one byte."""
    *head, last = kind.split("-")
    kv_dtype = ONE_BYTE.get(last)
    name = "-".join(head) if kv_dtype else kind
    if name.startswith("star"):
        strategy = attention.build(
            "star", block_size=BLOCK, anchor_size=ANCHOR, anchor_mode=name.split("-")[1], group=group
        )
    else:
        strategy = attention.build(name, group=group)
    strategy.kv_dtype = kv_dtype
    return strategy


def _run(model: models.Transformer, strategy: attention.AttentionStrategy) -> dict:
    """Phase-1 logits of this rank's context tokens, the query's logits, and greedy generation."""
    prompt = torch.tensor(_prompt())
    model.attention = strategy
    model.setup_cache(1, strategy.cache_slots(N_CTX, N_QUERY), dtype=strategy.kv_dtype)
    idx = strategy.context_indices(N_CTX)
    with torch.no_grad():
        strategy.set_phase("context")
        skip = strategy.recomputes_anchor * ANCHOR if strategy.name == "star" else 0
        context = model(prompt[idx][None], idx, span=len(prompt))[0][skip:]
        strategy.set_phase("query")
        query = model(prompt[None, N_CTX:], torch.arange(N_CTX, N_CTX + N_QUERY), span=len(prompt))[0]
    generated = torch.tensor(list(generate_tokens(model, prompt.tolist(), N_NEW, context_len=N_CTX)))
    return {"idx": idx[skip:], "context": context, "query": query, "generated": generated}


def _reference(path: str, kind: str) -> dict:
    """The one-rank model: global for global and ring (exact), star with the same blocks for star."""
    model = models.load_model(path, dtype=torch.float32, attention=attention.build("global"))
    return _run(model, _strategy(kind.replace("ring", "global")))


def _tp_worker(rank, world, paths: dict, layouts: list[tuple[int, list[str]]]) -> dict:
    from longctx.parallel.layout import make_layout

    out = {}
    for tp, kinds in layouts:
        layout = make_layout(tp, torch.device("cpu"))
        for name, path in paths.items():
            args = models.ModelArgs.from_json(f"{path}/config.json")
            model = models.load_model(
                path, dtype=torch.float32, attention=attention.build("ring"), tp=layout.tensor_parallel(args)
            )
            for kind in kinds:
                out[tp, name, kind] = _run(model, _strategy(kind, layout.cp_group))
    return out


def _check(results: list[dict], paths: dict, layouts) -> None:
    for tp, kinds in layouts:
        for name, path in paths.items():
            for kind in kinds:
                ref = _reference(path, kind)
                # one byte: hidden states summed across tp ranks in another order may carry a key across the boundary
                # between two codes (tests/test_kv_cache.py), moving logits by up to a step's worth
                atol = 1e-2 if kind.endswith(tuple(ONE_BYTE)) else 1e-4
                got = torch.empty_like(ref["context"])
                for r in results:
                    mine = r[tp, name, kind]
                    got[mine["idx"]] = mine["context"]  # (every tp rank of a host holds the host's tokens' logits)
                    torch.testing.assert_close(
                        mine["query"], ref["query"], atol=atol, rtol=0, msg=f"{name} {kind} tp={tp}"
                    )
                    assert mine["generated"].tolist() == ref["generated"].tolist(), f"{name} {kind} tp={tp}"
                torch.testing.assert_close(got, ref["context"], atol=atol, rtol=0, msg=f"{name} {kind} tp={tp}")


def test_tp2_on_one_host_equals_one_rank(hf_checkpoint):
    paths = {name: _path(hf_checkpoint, name) for name in FAMILIES}
    layouts = [(2, ["global"])]
    _check(run_ranks(2, _tp_worker, paths, layouts), paths, layouts)


def test_tp4_on_one_host_and_two_hosts_of_tp2_equal_one_rank(hf_checkpoint):
    # tp=4 with 2 KV heads: each KV head is replicated on 2 ranks
    paths = {name: _path(hf_checkpoint, name) for name in FAMILIES}
    layouts = [(4, ["global"]), (2, ["ring", "star-broadcast", "star-recompute"])]
    _check(run_ranks(4, _tp_worker, paths, layouts), paths, layouts)


def test_one_byte_kv_over_two_hosts_of_tp2_equals_it_on_one_rank(hf_checkpoint):
    # each rank's cache holds its KV heads in one byte; ring's shards and star's anchor travel in it
    paths = {"llama3": _path(hf_checkpoint, "llama3")}
    layouts = [(2, ["ring-fp8", "star-broadcast-fp8", "star-broadcast-int8"])]
    _check(run_ranks(4, _tp_worker, paths, layouts), paths, layouts)


# --- the cut, without processes

LLAMA_70B = models.ModelArgs(
    vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, intermediate_size=28672
)


def test_degrees_that_do_not_divide_are_refused_by_name():
    assert valid_degrees(LLAMA_70B) == [1, 2, 4, 8, 16, 32, 64]  # past 8, the 8 KV heads are replicated
    with pytest.raises(
        ValueError,
        match=r"parallel.tp=3 does not divide llama: its 64 query heads; valid tensor-parallel degrees: 1, 2, 4, 8, 16",
    ):
        check_degree(LLAMA_70B, 3, "llama")
    odd_kv = models.ModelArgs(n_heads=12, n_kv_heads=3, head_dim=8, dim=96, intermediate_size=48)
    with pytest.raises(ValueError, match="its 3 KV heads"):
        check_degree(odd_kv, 2)  # neither 3 % 2 nor 2 % 3: a KV head would be split
    assert valid_degrees(odd_kv) == [1, 3, 6, 12]
    one = local_args(LLAMA_70B, 16)
    assert (one.n_heads, one.n_kv_heads, one.intermediate_size, one.head_dim) == (4, 1, 1792, 128)


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (8, 2, 4), (4, 1, 2), (4, 4, 4)])
def test_each_rank_keeps_its_heads_and_the_kv_heads_they_use(heads, kv, tp):
    args = models.ModelArgs(
        vocab_size=32,
        dim=16,
        n_layers=1,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=4,
        intermediate_size=24,
        qkv_bias=True,
        o_bias=True,
    )
    whole = models.random_model(args, torch.float32)
    w = whole.layers[0]
    q, k, v = w.attention.wqkv.weight.split((heads * 4, kv * 4, kv * 4))
    gate, up = w.feed_forward.w13.weight.split((24, 24))
    parts = [
        TensorParallel(args, tp, r).parallelize(models.random_model(args, torch.float32)).layers[0] for r in range(tp)
    ]
    hq = heads // tp
    for r, p in enumerate(parts):
        lq, lk, lv = p.attention.wqkv.weight.split(p.attention.wqkv.splits)
        assert torch.equal(lq, q[r * hq * 4 : (r + 1) * hq * 4])
        used = sorted({h * kv // heads for h in range(r * hq, (r + 1) * hq)})  # the KV heads this rank's queries use
        assert torch.equal(lk, torch.cat([k[h * 4 : (h + 1) * 4] for h in used]))
        assert torch.equal(lv, torch.cat([v[h * 4 : (h + 1) * 4] for h in used]))
        assert (p.attention.n_heads, p.attention.n_kv_heads) == (hq, len(used))
        assert torch.equal(p.attention.wo.bias, w.attention.wo.bias)  # whole, added once after the sum
    assert torch.equal(torch.cat([p.attention.wo.weight for p in parts], 1), w.attention.wo.weight)
    assert torch.equal(torch.cat([p.feed_forward.w13.weight[: 24 // tp] for p in parts]), gate)
    assert torch.equal(torch.cat([p.feed_forward.w13.weight[24 // tp :] for p in parts]), up)
    assert torch.equal(torch.cat([p.feed_forward.w2.weight for p in parts], 1), w.feed_forward.w2.weight)


def test_tp1_leaves_the_model_untouched():
    args = local_args(LLAMA_70B, 1)
    with torch.device("meta"):
        model = models.Transformer(args)
    before = {n: p for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    assert TensorParallel(args, 1, 0).parallelize(model) is model
    assert {n: p for n, p in model.named_parameters()} == before and [type(m) for m in model.modules()] == modules


# --- loading shards


class _Allocated(LiveBytes):
    """Live bytes of storages the loader allocates: views of a file's memory map are file cache, not counted."""

    def __init__(self, maps: list[tuple[int, int]]):
        super().__init__()
        self.maps = maps

    def ignores(self, data_ptr: int) -> bool:
        return any(lo <= data_ptr < hi for lo, hi in self.maps)


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_each_rank_copies_out_and_holds_only_its_slices(family, hf_checkpoint, monkeypatch):
    from longctx.models import loading

    _, path = hf_checkpoint(family)
    args = models.ModelArgs.from_json(path / "config.json")
    whole = models.load_model(path, dtype=torch.bfloat16)
    whole_bytes = sum(p.nbytes for p in whole.parameters())
    maps: list[tuple[int, int]] = []
    opened = loading.MappedSafetensors.__init__

    def record(self, file):
        opened(self, file)
        start = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()
        maps.append((start, start + len(self.map)))

    monkeypatch.setattr(loading.MappedSafetensors, "__init__", record)
    for rank in range(2):
        with _Allocated(maps) as live:  # (the fp32 file is read into bf16 parameters: every copy is an op)
            model = models.load_model(
                path, dtype=torch.bfloat16, attention=attention.build("ring"), tp=TensorParallel(args, 2, rank)
            )
        held = sum(p.nbytes for p in model.parameters())
        assert all(p.untyped_storage().nbytes() == p.nbytes for p in model.parameters())  # nothing views a whole
        # beyond the parameters, less than one parameter's worth of copies in flight (reading a whole tensor to
        # slice it, as safetensors' get_slice does, breaks this)
        assert held <= live.peak < held + max(p.nbytes for p in model.parameters()), (held, live.peak)
        assert held < 0.6 * whole_bytes


# --- the runner's layout


def test_the_70b_command_is_valid_and_planned_per_rank(tmp_path):
    import json

    from longctx import runner
    from longctx.preflight import memory
    from tests.helpers import compose_cfg

    ckpt = tmp_path / "llama3_70b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 128256,
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "max_position_embeddings": 131072,
                "rope_theta": 500000.0,
            }
        )
    )
    cfg = compose_cfg(
        "model=llama3_70b", f"model.path={ckpt}", "attention=star", "ctx=128k", "parallel.nproc=8", "parallel.tp=4"
    )
    runner.validate(cfg)
    plan = memory.plan_config(cfg)
    assert plan.world == 8 and plan.tp == 4 and len(plan.ranks) == 8
    per_rank = plan.ranks[0].terms["weights"]
    full = memory.weight_bytes(models.ModelArgs.from_preset(cfg.model), plan.dtype)
    embeddings = 2 * 128256 * 8192 * plan.dtype.itemsize  # input and output embeddings stay whole on every rank
    assert per_rank == pytest.approx((full - embeddings) / 4 + embeddings, rel=1e-3)
    hosts_only = memory.plan_config(
        compose_cfg("model=llama3_70b", f"model.path={ckpt}", "attention=star", "ctx=128k", "parallel.nproc=2")
    )
    assert plan.ranks[0].terms["KV cache"] == pytest.approx(hosts_only.ranks[0].terms["KV cache"] / 4, rel=1e-3)


def test_a_model_too_large_for_one_gpu_is_told_the_tensor_parallel_degree_that_fits():
    from longctx.preflight import memory
    from tests.helpers import compose_cfg

    cfg = compose_cfg(
        "model=llama3_70b", "attention=global", "ctx=8k", "task=bench", "device=cuda", "memory.limit_gib=80"
    )
    with pytest.raises(memory.DoesNotFit, match=r"fits with parallel.nproc=2 parallel.tp=2$"):
        memory.check_fits(cfg, torch.device("cpu"))
