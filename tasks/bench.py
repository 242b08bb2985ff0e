"""task=bench: time to first token, decode tokens/s and peak memory per rank, one JSON record per run."""

from __future__ import annotations

import itertools
import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

import models
from preflight import memory
from tasks.context import Context, gather


# Decode steps bench leaves out of the decode rate: on CUDA the first runs eagerly and the second captures the CUDA
# graph that later steps replay (models.cuda_graph).
BENCH_SETUP_STEPS = 2


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
