"""task=bench: time to first token, decode tokens/s and peak memory per rank, one JSON record per run."""

from __future__ import annotations

import itertools
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from longctx import models
from longctx.conf.schema import OptionError, option
from longctx.models.config import ModelArgs
from longctx.preflight import memory
from longctx.tasks.context import Context, gather

# Decode steps bench leaves out of the decode rate: on CUDA the first runs eagerly and the second captures the CUDA
# graph that later steps replay (models.cuda_graph).
BENCH_SETUP_STEPS = 2


def _timed_steps(n: int) -> str | None:
    if n >= BENCH_SETUP_STEPS + 2:
        return None
    return (
        f"leaves no decode step to time: bench times decode after the first token and {BENCH_SETUP_STEPS} set-up "
        f"steps; use task.new_tokens >= {BENCH_SETUP_STEPS + 2}"
    )


@dataclass
class PlanOptions:
    prompt_tokens: int | None = option(None, "null: the ctx group's length", low=1)
    query_tokens: int = option(64, "the tail of the prompt that goes through phase 2", low=1)
    new_tokens: int = option(32, "tokens generated after the prompt", low=1)


@dataclass
class BenchOptions(PlanOptions):
    new_tokens: int = option(32, "tokens generated after the prompt", low=1, check=_timed_steps)
    warmup: int = option(1, "untimed runs first", low=0)
    repeats: int = option(2, "timed runs: the best TTFT and decode rate are kept", low=1)
    results_file: str = option("outputs/bench_results.jsonl", "each run's record is appended here")


def check(cfg, args: ModelArgs) -> None:
    """The prompt leaves context before its query tokens."""
    n, query = cfg.task.prompt_tokens or cfg.ctx.length, cfg.task.query_tokens
    if query >= n:
        raise OptionError(
            f"task.query_tokens={query} leaves no context in a prompt of {n} tokens; use fewer query tokens"
        )


def phase1_flops(model, strategy, n_ctx: int, tp: int = 1) -> int:
    """Phase 1's FLOPs over all ranks: 2 per block parameter per token the strategy feeds through the model for the
    linear layers, and 4·head_dim·query heads per (query, key) pair each layer attends (`strategy.attended_pairs`).
    `model` holds one tensor-parallel rank's slice."""
    args = model.args
    params = sum(p.numel() for p in model.layers.parameters()) * tp  # the blocks' (the last norm's are a rounding)
    pairs = sum(strategy.attended_pairs(n_ctx, window) for window in args.layer_windows)
    return 2 * params * strategy.phase1_tokens(n_ctx) + 4 * args.head_dim * args.n_heads * tp * pairs


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
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": c.cfg.model.name,
        "attention": c.cfg.attention.name,
        "ctx": n,
        "ranks": c.world,
        "hosts": c.layout.hosts,
        "tp": c.layout.tp,
        "device": torch.cuda.get_device_name() if c.device.type == "cuda" else "cpu",
        "dtype": str(c.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "random_weights": c.tok is None,
        "ttft_s": ttft,
        "prefill_tok_s": n / ttft,
        "decode_tok_s": decode,
        "phase1_flops": phase1_flops(c.model, c.model.attention, n_ctx, c.layout.tp),
        "peak_mem_bytes_per_rank": peaks,
        "peak_mem_kind": "cuda allocated" if c.device.type == "cuda" else "process max RSS",
        "planned_peak_bytes_per_rank": planned_peaks,
        "peak_host_bytes_per_rank": host_peaks,
        **c.model.attention.record(),
        "decode": c.model.attention.decode.options(),
        "kv_dtype": c.cfg.kv.dtype,
        "chunk": c.cfg.ctx.get("chunk"),
        "phase1_passes": len(c.model.attention.context_passes(n_ctx)),
        "kv_bytes_per_rank": gather(c.model.cache.kv_bytes(), c.world),
    }
    if c.lead:
        path = Path(t.results_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise OSError(f"task.results_file={path}: {e.strerror or e} while appending the record") from None
        c.say(
            f"time to first token {ttft:.3f} s · prefill {n / ttft:.0f} tok/s · decode {decode:.1f} tok/s · "
            f"peak memory per rank {', '.join(f'{p / 2**30:.2f} GiB' for p in peaks)} (planned "
            f"{', '.join(f'{p / 2**30:.2f}' for p in planned_peaks)}) · peak host memory per rank "
            f"{', '.join(f'{p / 2**30:.2f} GiB' for p in host_peaks)} → {path}"
        )
    return record
