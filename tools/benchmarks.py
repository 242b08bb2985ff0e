"""The GPU benchmarks (tools/bench/): prints each table and makes it its figure's current one in BENCHMARKS.md.

    python tools/benchmarks.py decode [--tune]       # decode attention: Lean kernel vs SDPA vs a fixed split
    python tools/benchmarks.py prefill [--tune]      # phase-1 attention: fused SDPA kernels vs FlexAttention by shape
    python tools/benchmarks.py hsr [--profile]       # HSR sparse decode attention vs dense Lean, by share read
    python tools/benchmarks.py gemv                  # batch-1 projections: weights stored row- vs column-major
    python tools/benchmarks.py model [--ctx 4096,65536]   # Llama-3.1-8B shapes, batch-1 decode vs transformers generate
    python tools/benchmarks.py hsr-model --contexts 131072,262144   # HSR decode end to end, over a planted cache too
    python tools/benchmarks.py shapes                # prompts of many lengths: what compiles, how long it takes
    python tools/benchmarks.py ttft --nproc 4 --ctx-names 64k,128k   # star vs ring time to first token (runner.py -m)
    python tools/benchmarks.py tp --nproc 2          # tensor parallel on one host vs star/ring over the GPUs
    python tools/benchmarks.py hosts --nproc 8 --ctx-names 128k,512k,1m   # star vs ring as hosts grow
    python tools/benchmarks.py memory --longest 294912   # the memory plan against the measured peak (runner.py)
    python tools/benchmarks.py memory --models smollm2,gemma3_270m --lengths 8192 --nproc 1   # the same on CPU
    python tools/benchmarks.py kv --lengths 32768,131072 --longest-kv 1048576   # bf16 vs FP8 and int8 KV, chunked vs one pass
    python tools/benchmarks.py kv --lengths "" --longest-kv 1048576   # the 1M star FP8 run alone (an H200), 64K blocks
    python tools/benchmarks.py kv --attention star --results runs.jsonl   # resumable: runs.jsonl's runs are not run again
    python tools/benchmarks.py kv-fits fp8-lean       # the longest context that fits; Lean decode bf16 vs FP8, int8
    python tools/benchmarks.py fp8-scales             # FP8 round-trip error by scale granularity (CPU, SmolLM2)
    python tools/benchmarks.py fp8-write              # the FP8 cache's write kernel by program shape

Parts combine (`decode prefill model`). Each table replaces its figure's table in `--append FILE` (default
BENCHMARKS.md; `-` for none): one current table per figure, git keeps the ones before. `--jsonl FILE` also writes
every row as JSON. Timings are CUDA-event times after a warm-up; "graph" times replay the calls from a CUDA graph,
which is how decode runs in the model, so they leave out Python launch cost.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from longctx.parallel.launch import MULTICAST_OFF
from longctx.tools.bench import kernels, kv, memory, model, runs
from longctx.tools.bench.common import ROOT, K, Recorder, publish


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return text.split(",")


# part -> (function, its keyword arguments from the command line)
PARTS = {
    "decode": (kernels.bench_decode, lambda a: dict(quick=a.quick, tune=a.tune)),
    "prefill": (kernels.bench_prefill, lambda a: dict(quick=a.quick, tune=a.tune)),
    "hsr": (kernels.bench_hsr, lambda a: dict(quick=a.quick, profile=a.profile)),
    "gemv": (kernels.bench_gemv, lambda a: dict(quick=a.quick)),
    "model": (
        model.bench_model,
        lambda a: dict(contexts=_ints(a.ctx or "4096,65536"), quick=a.quick, profile=a.profile),
    ),
    "decode-ahead": (model.bench_ahead, lambda a: dict(contexts=_ints(a.ctx or "32768,131072"), quick=a.quick)),
    "hsr-model": (model.bench_hsr_model, lambda a: dict(contexts=_ints(a.contexts), quick=a.quick)),
    "shapes": (model.bench_shapes, lambda a: dict(quick=a.quick)),
    "ttft": (
        runs.bench_ttft,
        lambda a: dict(
            strategies=_names(a.attention or "ring,star"),
            ctx_names=_names(a.ctx_names),
            nproc=a.nproc,
            warmup=a.warmup,
            quick=a.quick,
        ),
    ),
    "tp": (
        runs.bench_tp,
        lambda a: dict(model=_names(a.models)[0], nproc=a.nproc, ctx_names=_names(a.ctx_names), quick=a.quick),
    ),
    "hosts": (
        runs.bench_hosts,
        lambda a: dict(model=_names(a.models)[0], nproc=a.nproc, ctx_names=_names(a.ctx_names), quick=a.quick),
    ),
    "kv": (
        kv.bench_kv,
        lambda a: dict(
            contexts=_ints(a.lengths) if a.lengths is not None else [32 * K, 128 * K],
            strategies=_names(a.attention or "global,star"),
            longest=a.longest_kv,
            longest_block=a.longest_block or kv.LONGEST_BLOCK,
            warmup=a.warmup,
            quick=a.quick,
            results=a.results,
        ),
    ),
    "kv-fits": (kv.bench_kv_fits, lambda a: dict(quick=a.quick)),
    "fp8-lean": (
        kv.bench_lean_fp8,
        lambda a: dict(
            contexts=_ints(a.lengths) if a.lengths else [32 * K, 128 * K, 256 * K, 1024 * K], quick=a.quick, tune=a.tune
        ),
    ),
    "fp8-scales": (kv.bench_fp8_scales, lambda a: dict(quick=a.quick)),
    "fp8-write": (kv.bench_fp8_write, lambda a: dict(quick=a.quick)),
    "memory": (
        memory.bench_memory,
        lambda a: dict(
            models=_names(a.models),
            strategies=_names(a.attention or "ring,star"),
            nproc=a.nproc,
            lengths=_ints(a.lengths) if a.lengths else None,
            longest=a.longest,
            quick=a.quick,
        ),
    ),
}


def exit_on_sigterm() -> None:
    """A time limit's SIGTERM unwinds (subprocess.run then kills its runner and waits for it to go), so that the GPU
    memory of a run cut short is free before the next command measures what is free."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=sorted(PARTS))
    parser.add_argument(
        "--tune", action="store_true", help="decode: sweep Lean launch settings first; prefill: try flex kernel_options"
    )
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--profile", action="store_true", help="model, hsr: GPU time per kernel of a decode step")
    parser.add_argument(
        "--ctx", help="model (default 4096,65536), decode-ahead (default 32768,131072): prompt tokens, comma-separated"
    )
    parser.add_argument("--ctx-names", default="64k,128k", help="ttft, tp, hosts: ctx presets")
    parser.add_argument("--contexts", default="131072,262144", help="hsr-model: comma-separated prompt lengths")
    parser.add_argument("--attention", help="ttft, memory (default ring,star), kv (default global,star): strategies")
    parser.add_argument(
        "--nproc", type=int, default=max(1, torch.cuda.device_count()), help="ttft, tp, hosts, memory: ranks"
    )
    parser.add_argument("--warmup", type=int, default=1, help="ttft: warm-up runs")
    parser.add_argument("--longest", type=int, default=256 * K, help="memory: the longest context measured")
    parser.add_argument(
        "--lengths", help="memory, kv, fp8-lean: comma-separated contexts in tokens instead of their defaults"
    )
    parser.add_argument("--longest-kv", type=int, help="kv: star with FP8 KV at this context too (1M on an H200)")
    parser.add_argument("--longest-block", type=int, help="kv: star's block at --longest-kv (default 65536)")
    parser.add_argument(
        "--results",
        type=Path,
        help="kv: the runs' records go to this file, and the runs it holds are not run again (a sweep cut short "
        "by a time limit goes on where it stopped)",
    )
    parser.add_argument(
        "--models", default="llama3", help="memory: comma-separated model presets; tp, hosts: the first"
    )
    parser.add_argument(
        "--append",
        default="BENCHMARKS.md",
        help="markdown file whose figures the tables become the current ones of; - for none",
    )
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not set(args.parts) <= {"memory", "fp8-scales"}:
        parser.error("the benchmarks need a CUDA GPU (all but `memory` and `fp8-scales`, which run on CPU)")
    for switch, off in MULTICAST_OFF.items():
        os.environ.setdefault(switch, off)
    exit_on_sigterm()
    rec = Recorder(args.jsonl)
    for part in args.parts:
        bench, options = PARTS[part]
        for table in bench(rec, **options(args)):
            text = table.markdown()
            print(text, flush=True)
            if args.append != "-":
                target = ROOT / args.append if not Path(args.append).is_absolute() else Path(args.append)
                doc = publish(target.read_text() if target.is_file() else "# Benchmarks\n", text, table.figure or part)
                tmp = target.with_suffix(".tmp")
                tmp.write_text(doc)
                tmp.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
