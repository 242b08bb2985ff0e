"""task=bench: time to first token, decode tokens/s and peak memory per rank, one JSON record per run."""

from __future__ import annotations

import itertools
import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longctx import models
from longctx.preflight import memory
from longctx.tasks.context import Context, gather

# Decode steps bench leaves out of the decode rate: on CUDA the first runs eagerly and the second captures the CUDA
# graph that later steps replay (models.cuda_graph).
BENCH_SETUP_STEPS = 2


def attended_pairs(n: int, window: int | None, block: int | None = None, anchor: int = 0) -> int:
    """(query, key) pairs causal attention over n tokens attends: each query sees the keys of its own block (all
    tokens without `block`) and, past the first block, the anchor's `anchor` tokens, at most `window` back."""
    p = torch.arange(n, dtype=torch.int64)
    start = p - p % block if block else torch.zeros_like(p)
    lo = (p - window + 1).clamp_min(0) if window is not None else torch.zeros_like(p)
    own = p - torch.maximum(start, lo) + 1
    seen_anchor = torch.where(start > 0, (min(anchor, n) - lo).clamp_min(0), 0)
    return int(own.sum() + seen_anchor.sum())


def phase1_flops(model, strategy, n_ctx: int, tp: int = 1) -> int:
    """Phase 1's FLOPs over all ranks, counted as issue 15 states them: 2 per block parameter per token for the
    linear layers, and 4·head_dim·query heads per (query, key) pair each layer attends: the causal triangle for
    global and ring; for star each block's triangle and, past the first, block × anchor, and the anchor again (its
    tokens and its triangle) on every rank that recomputes it. `model` holds one tensor-parallel rank's slice."""
    args = model.args
    params = sum(p.numel() for p in model.layers.parameters()) * tp  # the blocks' (the last norm's are a rounding)
    star = strategy.name == "star"
    anchor = min(strategy.anchor_size, n_ctx) if star else 0
    recomputing = 0  # ranks that encode the anchor again
    if star and strategy.anchor_mode == "recompute":
        recomputing = min(strategy.world, -(-n_ctx // strategy.block_size)) - 1
    pairs = 0
    for window in args.layer_windows:
        if star:
            pairs += attended_pairs(n_ctx, window, strategy.block_size, anchor) + recomputing * attended_pairs(anchor, window)
        else:
            pairs += attended_pairs(n_ctx, window)
    return 2 * params * (n_ctx + recomputing * anchor) + 4 * args.head_dim * args.n_heads * tp * pairs


def task_bench(c: Context) -> dict:
    t = c.cfg.task
    n = t.prompt_tokens or c.cfg.ctx.length
    gen = torch.Generator().manual_seed(c.cfg.seed)
    ids = torch.randint(0, c.model.args.vocab_size, (n,), generator=gen).tolist()
    n_ctx = max(1, n - t.query_tokens)
    if c.tok is None:
        c.say(f"{c.cfg.model.name}: no checkpoint, benchmarking random weights of its shape")

    def once() -> tuple[float, float]:
        c.model.attention = c.strategy(n_ctx)
        c.describe_blocks(n_ctx)
        sync()
        start = time.perf_counter()
        it = models.generate_tokens(c.model, ids, t.new_tokens, max_seq_len=c.max_seq_len, context_len=n_ctx)
        next(it)
        sync()
        first = time.perf_counter()
        for _ in itertools.islice(it, BENCH_SETUP_STEPS):
            pass
        sync()
        steady = time.perf_counter()
        rest = sum(1 for _ in it)
        sync()
        end = time.perf_counter()
        return first - start, rest / (end - steady) if rest else float("nan")

    def sync() -> None:
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        if c.world > 1:
            dist.barrier()

    for _ in range(t.warmup):
        once()
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(t.repeats)]
    ttft = min(r[0] for r in runs)
    decode = max(r[1] for r in runs)
    host_peaks = gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, c.world)  # loading included
    peaks = gather(torch.cuda.max_memory_allocated(), c.world) if c.device.type == "cuda" else host_peaks
    planned = memory.plan_config(c.cfg)
    planned_peaks = [r.total + (0 if c.device.type == "cuda" else memory.RUNTIME_BYTES["cpu"]) for r in planned.ranks]
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": c.cfg.model.name, "attention": c.cfg.attention.name,
        "ctx": n, "ranks": c.world, "hosts": c.layout.hosts, "tp": c.layout.tp, "device": torch.cuda.get_device_name() if c.device.type == "cuda" else "cpu",
        "dtype": str(c.dtype).removeprefix("torch."), "torch": torch.__version__, "random_weights": c.tok is None,
        "ttft_s": ttft, "prefill_tok_s": n / ttft, "decode_tok_s": decode,
        "phase1_flops": phase1_flops(c.model, c.model.attention, n_ctx, c.layout.tp),
        "peak_mem_bytes_per_rank": peaks, "peak_mem_kind": "cuda allocated" if c.device.type == "cuda" else "process max RSS",
        "planned_peak_bytes_per_rank": planned_peaks, "peak_host_bytes_per_rank": host_peaks,
        **{k: v for k, v in c.strategy_params().items() if k in ("block_size", "anchor_size", "anchor_mode")},
    }  # fmt: skip
    if c.lead:
        path = Path(t.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        c.say(f"time to first token {ttft:.3f} s · prefill {n / ttft:.0f} tok/s · decode {decode:.1f} tok/s · "
              f"peak memory per rank {', '.join(f'{p / 2**30:.2f} GiB' for p in peaks)} (planned "
              f"{', '.join(f'{p / 2**30:.2f}' for p in planned_peaks)}) · peak host memory per rank "
              f"{', '.join(f'{p / 2**30:.2f} GiB' for p in host_peaks)} → {path}")  # fmt: skip
    return record
