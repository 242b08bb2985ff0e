"""Benchmarks of the whole model on a GPU (Llama-3.1-8B shapes, random weights): batch-1 decode against transformers,
HSR's decode end to end, and a run over prompts of many lengths (what compiles)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from longctx.attention.hsr import HSRDecode
from longctx.tools.bench.common import (
    K,
    Recorder,
    Table,
    copy_bandwidth,
    llama3_args,
    per_gpu,
    timed_generation,
)


def _streamed_weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: all but the embedding table, of which it reads one row."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))


def bench_model(rec: Recorder, contexts: list[int], quick: bool = False, profile: bool = False) -> list[Table]:
    """Batch-1 decode of Llama-3.1-8B shapes (random weights) after prompts of each `--ctx` length; transformers in
    the same run."""
    from longctx import attention
    from longctx.attention.fusion import COMPILE_ELEMENTWISE
    from longctx.models.loading import random_model

    new = 64
    args, preset = llama3_args(max(contexts) + 4096)
    model = random_model(args, torch.bfloat16, "cuda")
    bw = copy_bandwidth()
    weight_bytes = _streamed_weight_bytes(model)
    table = Table(
        f"Llama-3.1-8B shapes, batch-1 decode after a prompt of {' or '.join(f'{S:,}' for S in contexts)} tokens, vs transformers generate",
        f"python tools/benchmarks.py model --ctx {','.join(map(str, contexts))}" + (" --profile" if profile else ""),
        [
            "engine",
            "attention",
            "context",
            "TTFT (s)",
            "decode (tok/s)",
            "bound (tok/s)",
            "% of bound",
            "vs transformers",
        ],
    )
    table.figure = "model"
    table.notes.append(
        f"Random weights, bf16. Bound: copy bandwidth {bw / 1e12:.2f} TB/s / ({weight_bytes / 1e9:.1f} GB of weights read "
        f"per token, the embedding table excluded, + the KV cache at that context). {new} new tokens; decode tok/s "
        "over the replayed CUDA-graph steps (from the fourth token: `timed_generation`)."
    )
    hf = None
    for S in contexts:
        kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2 * (S + new // 2)
        bound = bw / (weight_bytes + kv_bytes)
        prompt = torch.randint(0, args.vocab_size, (S,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = []
        for name, fused in (("global", True), ("global", False), ("star", True)):
            params = {"block_size": -(-S // 4)} if name == "star" else {}
            with COMPILE_ELEMENTWISE.scoped(fused):
                for attempt in range(2):  # the first run compiles
                    model.attention = attention.build(name, **params)
                    ttft, rate = timed_generation(model, prompt, new, S - 64)
            engine = "longctx (CUDA graphs)" if fused else "longctx (CUDA graphs), norm/rotary/SwiGLU not compiled"
            rows.append([engine, name, S, ttft, rate])
        if profile:
            table.notes.append(f"{S:,}-token context. " + profile_decode(model, S))
        model.setup_cache(1, 1)  # the KV cache goes before transformers' copy of the weights comes
        if hf is None:
            hf = _hf_copy(model, preset)
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            for max_new in (1, 1, new):  # warm-up, TTFT, whole generation
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = hf.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                if max_new == 1:
                    ttft = elapsed
            hf_rate = (out.shape[1] - S - 1) / (elapsed - ttft)
        del out
        torch.cuda.empty_cache()
        rows.append(["transformers generate (sdpa)", "global", S, ttft, hf_rate])
        for r in rows:
            table.rows.append([*r, bound, 100 * r[4] / bound, r[4] / hf_rate])
            rec.emit(
                dict(zip(["engine", "attention", "ctx", "ttft_s", "decode_tok_s"], r), bound_tok_s=bound), part="model"
            )
    return [table]


def bench_ahead(rec: Recorder, contexts: list[int], quick: bool = False) -> list[Table]:
    """Batch-1 decode of Llama-3.1-8B shapes (random weights, global attention) with each token read back before the
    step that takes it is queued, against running ahead (`generate_tokens`'s `ahead`), bf16 and FP8 KV."""
    from longctx import attention
    from longctx.models.loading import random_model

    new = 32 if quick else 128
    contexts = contexts[:1] if quick else contexts
    args, _ = llama3_args(max(contexts) + new)
    model = random_model(args, torch.bfloat16, "cuda")
    bw = copy_bandwidth()
    weight_bytes = _streamed_weight_bytes(model)
    table = Table(
        "Llama-3.1-8B shapes, batch-1 decode: each token read back before the next step is queued, against running "
        "one step ahead",
        f"python tools/benchmarks.py decode-ahead --ctx {','.join(map(str, contexts))}" + (" --quick" if quick else ""),
        ["context", "KV", "reading first (tok/s)", "ahead (tok/s)", "ahead / reading first", "% of bound, ahead",
         "vs bf16, reading first", "vs bf16, ahead"],
    )  # fmt: skip
    table.figure = "decode-ahead"
    table.notes.append(
        f"Random weights, global attention, {new} new tokens; tok/s over the replayed CUDA-graph steps "
        "(`timed_generation`). Reading first: the host waits for each token (the logits' finiteness with it) before "
        "it queues the step that takes it, so the device idles while the host reads, yields and launches; ahead: "
        "that step is queued first. Bound: copy bandwidth "
        f"{bw / 1e12:.2f} TB/s / ({weight_bytes / 1e9:.1f} GB of weights, the embedding table excluded, + the KV "
        "cache read per token, its scales included)."
    )
    for S in contexts:
        prompt = torch.randint(0, args.vocab_size, (S,), generator=torch.Generator().manual_seed(0)).tolist()
        rates = {}
        for kv in ("bf16", "fp8"):
            strategy = attention.build("global")
            strategy.kv_dtype = torch.float8_e4m3fn if kv == "fp8" else None
            model.attention = strategy
            for ahead in (True, False, True):  # the first run compiles
                rates[kv, ahead] = timed_generation(model, prompt, new, S - 64, ahead=ahead)[1]
            per_token = model.cache.kv_bytes() / model.cache.capacity
            bound = bw / (weight_bytes + per_token * (S + new // 2))
            first, ahead_rate = rates[kv, False], rates[kv, True]
            row = [S, kv, first, ahead_rate, ahead_rate / first, 100 * ahead_rate / bound]
            row += [first / rates["bf16", False], ahead_rate / rates["bf16", True]]
            table.rows.append(row)
            rec.emit(dict(ctx=S, kv=kv, reading_first_tok_s=first, ahead_tok_s=ahead_rate, bound_tok_s=bound),
                     part="decode-ahead")  # fmt: skip
        model.setup_cache(1, 1)
    return [table]


def _hf_copy(model, preset: dict):
    """A transformers LlamaForCausalLM with the same weights, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.models.loading import fused_rows, hf_to_ours

    config = LlamaConfig(**{k: v for k, v in preset.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            ours_name, part = hf_to_ours(name)
            p.copy_(ours[ours_name][fused_rows(model, ours_name, part)])
    return hf.eval()


def profile_decode(model, S: int) -> str:
    """GPU time per kernel kind over eager decode steps after S cached tokens: where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from longctx import attention

    model.attention = attention.build("global")
    model.setup_cache(1, S + 8)  # an empty cache of the benchmark's size: decode reads every slot all the same
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        model(tok, torch.tensor([S], device="cuda"))  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                model(tok, torch.tensor([S + 1 + i], device="cuda"))
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:14]
    lines = [f"{e.self_device_time_total / 3 / 1e3:7.3f} ms/token {e.count // 3:5d}x  {e.key[:90]}" for e in top]
    kernels = sum(e.count for e in events) // 3
    text = (
        f"Profile of eager decode steps: {total / 3 / 1e3:.2f} ms of GPU time per token in {kernels} kernels.\n\n```\n"
        + "\n".join(lines)
        + "\n```"
    )
    print(text, flush=True)
    return text


def graph_kernels(model, S: int) -> int:
    """Kernels one replay of the model's captured decode step launches (CUDA graph kernels, counted by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from longctx.models.generate import generate_tokens

    prompt = torch.randint(0, model.args.vocab_size, (S,), generator=torch.Generator().manual_seed(0)).tolist()
    it = generate_tokens(model, prompt, 6)
    for _ in range(4):  # first token, the eager step, the capture, one replay
        next(it)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        next(it)
        torch.cuda.synchronize()
    return sum(
        e.count
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and "Memcpy" not in e.key and "Memset" not in e.key
    )


# --- sparse decode (HSR) end to end


def plant_model_cache(model, share: float, block: int = 64, sink: int = 64, strength: float = 128.0) -> None:
    """Rewrite every layer's cached keys (in place, summaries too) so that a known share of key blocks matters to any
    query: between the blocks (of `block` slots) of the first `sink` tokens and the last 1,024 slots, every
    (1/share)-th block holds keys +-strength x a random unit vector (pairs of opposite signs, so some key of the block
    scores high whatever the query) and every other block holds zero keys (score exactly 0). Values, the sink and the
    recent tokens stay as computed."""
    cache = model.cache
    first, last = -(-sink // block), (cache.used - 1024) // block
    positions = cache.positions
    filled = positions >= 0
    slots = torch.arange(filled.numel(), device=positions.device)
    hot = torch.arange(first, last, max(1, round(1 / share)), device=positions.device)
    gen = torch.Generator(positions.device).manual_seed(0)
    for layer in cache.layers:
        B, H, _, D = layer.k.shape
        blocks = layer.k[:, :, : last * block].view(B, H, last, block, D)
        blocks[:, :, first:] = 0
        u = (
            F.normalize(torch.randn(B, H, len(hot), block // 2, D, device=positions.device, generator=gen), dim=-1)
            * strength
        )
        blocks[:, :, hot] = torch.cat((u, -u), dim=3).to(blocks.dtype)
        if layer.summary is not None:  # (decode=hsr) the graph to be captured reads these very tensors: refill them
            layer.summary.reset()
            layer.summary.update(slots[filled], layer.k[:, :, filled], positions[filled])
    decode = model.attention.decode
    if isinstance(decode, HSRDecode) and decode.stats is not None:
        decode.stats.zero_()  # count decode steps over the planted cache only


def bench_hsr_model(rec: Recorder, contexts: list[int], quick: bool = False) -> list[Table]:
    """Batch-1 decode of Llama-3.1-8B shapes (random weights) with decode=dense and decode=hsr after the same
    prompt: over the cache as the model computed it (not with `quick`), and over one planted so that 5% of key
    blocks matter."""
    from longctx import attention
    from longctx.models.generate import generate_tokens
    from longctx.models.loading import random_model

    new, planted = 32, 0.05
    table = Table(
        "Llama-3.1-8B shapes, batch-1 decode, dense vs HSR sparse decode (random weights)",
        "python tools/benchmarks.py hsr-model --contexts "
        + ",".join(map(str, contexts))
        + (" --quick" if quick else ""),
        [
            "context",
            "phase 1",
            "KV cache",
            "decode",
            "decode (tok/s)",
            "blocks read",
            "largest certificate",
            "HSR / dense",
        ],
    )
    table.figure = per_gpu("hsr-model")
    table.notes.append(
        f"bf16, {new} new tokens, CUDA-graph decode (tok/s over the replayed steps: `timed_generation`), decode=hsr with eps 1e-3, block 64, sink 64, "
        "recent 256. 'as computed': random weights attend almost uniformly, so a certified selection must read nearly "
        "every block; these rows show what HSR's selection costs a step when it saves nothing. "
        f"'{planted:.0%} planted': after the first token and before the first decode step, every layer's cached keys "
        f"are rewritten (`plant_model_cache`): every {round(1 / planted)}th block between the sink and the last 1,024 "
        "slots holds keys of norm 128 in pairs of opposite sign (some key of it scores high against any query), the "
        "others zero keys; values, sink and recent tokens stay as computed. What a certified selection must read is "
        "then known; dense decode runs over the same cache. Contexts past 128K fill the cache with star's phase 1 "
        "(4 blocks on one rank), which leaves phase 2 as global's."
    )
    for S in contexts:
        args, _ = llama3_args(S + 1024)
        model = random_model(args, torch.bfloat16, "cuda")
        prompt = torch.randint(0, args.vocab_size, (S,), generator=torch.Generator().manual_seed(0)).tolist()
        name, params = ("star", {"block_size": -(-S // 4)}) if S > 128 * K else ("global", {})
        for cache in (f"{planted:.0%} planted",) if quick else ("as computed", f"{planted:.0%} planted"):
            plant = (lambda m: plant_model_cache(m, planted)) if cache != "as computed" else None
            rates = {}
            for decode in ("dense", "hsr"):
                model.attention = attention.build(name, decode=attention.build_decode({"name": decode}), **params)
                list(
                    generate_tokens(model, prompt[:4096], new, context_len=4096 - 64)
                )  # compiles the decode step's kernels
                _, rates[decode] = timed_generation(model, prompt, new, S - 64, plant)
                report = model.attention.decode_report() or {}
                row = [
                    S,
                    name,
                    cache,
                    decode,
                    rates[decode],
                    f"{report['hsr_blocks_read_share']:.1%}" if report else "–",
                    f"{report['hsr_max_certificate']:.1e}" if report else "–",
                    rates[decode] / rates["dense"],
                ]
                table.rows.append(row)
                rec.emit(
                    dict(zip(["context", "phase1", "cache", "decode", "tok_s"], row[:5]), **report), part="hsr-model"
                )
                print(row, flush=True)
        del model
        torch.cuda.empty_cache()
    return [table]


# --- compiles over prompts of many lengths


def bench_shapes(rec: Recorder, quick: bool = False) -> list[Table]:
    """A run over prompts of many lengths, phase 1 on FlexAttention with exact or bucketed shapes, or on the fused
    kernels (the default where they run): graphs compiled, wall time."""
    from torch._dynamo.utils import counters

    from longctx.attention import fused, kernels
    from longctx.models.generate import generate_tokens
    from longctx.models.loading import random_model

    n = 30 if quick else 100
    args, _ = llama3_args(16 * K)
    args = replace(args, n_layers=4, layer_windows=args.layer_windows[:4])
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(1000, 9000, (n,), generator=rng).tolist()
    table = Table(
        f"{n} prompts of {n} different lengths (1,000 to 9,000 tokens): FlexAttention shapes exact vs bucketed, and the fused kernels",
        "python tools/benchmarks.py shapes",
        ["phase-1 kernel", "prompts", "graphs compiled", "wall time (s)", "s per prompt"],
    )
    table.figure = "shapes"
    table.notes.append(
        "Llama-3.1-8B layer shapes, 4 layers, random weights, bf16; each prompt through phase 1 (global) and 4 new "
        "tokens. A bucketed run pads both sequence lengths up to the next of m buckets per octave (at most 1/m more) "
        "with position -1; 'exact' compiles every new (queries, keys) shape. The fused kernels (attention.fused, cuDNN "
        "here) compile nothing: only the elementwise chains compile. Graphs compiled: dynamo's unique "
        "graphs over the run (FlexAttention, its block masks, the fused elementwise chains); before each run dynamo is "
        "reset and Inductor and Triton get empty caches, so each run compiles as on a new machine."
    )
    runs = (
        ("Flex, exact shapes", None, {}),
        ("Flex, 4 buckets per octave", 4, {}),
        ("fused (default)", kernels.FLEX_BUCKETS.get(), fused.FUSED_KERNELS.get()),
    )
    for label, buckets, kernel_table in runs:
        # Nothing compiled before serves the run: dynamo reset, empty Inductor and Triton caches (as on a new machine)
        torch._dynamo.reset()
        fresh = tempfile.mkdtemp(prefix="longctx-shapes-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = fresh, os.path.join(fresh, "triton")
        model = random_model(args, torch.bfloat16, "cuda")
        before = counters["stats"]["unique_graphs"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with kernels.FLEX_BUCKETS.scoped(buckets), fused.FUSED_KERNELS.scoped(kernel_table):
            for L in lengths:
                list(generate_tokens(model, torch.randint(0, args.vocab_size, (L,), generator=rng).tolist(), 4))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        row = [label, n, counters["stats"]["unique_graphs"] - before, wall, wall / n]
        table.rows.append(row)
        rec.emit(dict(zip(["shapes", "prompts", "graphs", "wall_s", "s_per_prompt"], row)), part="shapes")
        print(row, flush=True)
        del model
    return [table]
