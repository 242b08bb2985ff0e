"""Benchmarks that run `runner.py task=bench` on a machine's GPUs: star against ring time to first token, tensor
parallelism inside a host against star and ring across GPUs, and star against ring as the hosts grow."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from longctx.tools.bench.common import ROOT, K, Recorder, Table, copy_bandwidth, matmul_peak
from longctx.tools.bench.model import graph_kernels


def bench_ttft(
    rec: Recorder, strategies: list[str], ctx_names: list[str], nproc: int, warmup: int = 1, quick: bool = False
) -> list[Table]:
    """The strategies' time to first token through the runner (one process per GPU), star's block context / 4."""
    results = Path(tempfile.mkdtemp()) / "ttft.jsonl"
    argv = [
        sys.executable,
        "runner.py",
        "-m",
        "task=bench",
        "model=llama3",
        f"attention={','.join(strategies)}",
        f"ctx={','.join(ctx_names)}",
        f"parallel.nproc={nproc}",
        "task.new_tokens=8",
        "task.repeats=1",
        f"task.warmup={warmup}",
        "wandb.mode=disabled",
        f"task.results_file={results}",
    ]
    subprocess.run(argv, cwd=ROOT, check=True)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    table = Table(
        f"Llama-3.1-8B shapes, {' vs '.join(strategies)} time to first token on {nproc} GPU{'s' * (nproc > 1)}",
        " ".join(["python"] + argv[1:-1]),
        [
            "attention",
            "GPUs",
            "context",
            "TTFT (s)",
            "prefill (tok/s)",
            "phase-1 MFU",
            "decode (tok/s)",
            "peak memory per GPU (GiB)",
            "ring / star",
        ],
    )
    table.figure = f"ttft-{nproc}gpu"
    peak = matmul_peak()
    table.notes.append(
        "Random weights, bf16. TTFT covers phase 1 and phase 2 (the last 64 prompt tokens) up to the first token"
        + (", after a warm-up run." if warmup else "; no warm-up run: compilation is included.")
        + " Star's block is a quarter of the context (one block per GPU on 4)."
        + f" Phase-1 MFU: `tasks.bench.phase1_flops` (2·non-embedding parameters·tokens + 4·head dim·query heads·layers "
        f"per attended (query, key) pair: the causal triangle for global and ring; for star each block's triangle and, "
        f"past the first, block × anchor) over TTFT × GPUs × the bf16 matmul peak measured in the same run, "
        f"{peak / 1e12:.0f} TFLOP/s (8192³, `matmul_peak`)."
    )
    ring = {r["ctx"]: r["ttft_s"] for r in records if r["attention"] == "ring"}
    for r in records:
        ratio = ring[r["ctx"]] / r["ttft_s"] if r["attention"] == "star" and r["ctx"] in ring else float("nan")
        mfu = r["phase1_flops"] / r["ttft_s"] / (peak * r["ranks"])  # ranks: every GPU of the run
        table.rows.append(
            [
                r["attention"],
                r["ranks"],
                r["ctx"],
                r["ttft_s"],
                r["prefill_tok_s"],
                f"{mfu:.0%}",
                r["decode_tok_s"],
                ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"]),
                ratio,
            ]
        )
        rec.emit(r, part="ttft")
    return [table]


# --- tensor parallelism inside a host


def bench_tp(rec: Recorder, model: str, nproc: int, ctx_names: list[str], quick: bool = False) -> list[Table]:
    """Tensor parallel on one host at every degree up to `nproc` (tp=1 on one GPU included), against star and ring
    over the same GPUs as hosts, and on 4 or more GPUs 2 hosts × tp; decode against the bandwidth bound per rank.
    For a model that fits one GPU, first the decode-graph kernels of tp=1 against the untouched model."""
    from omegaconf import OmegaConf

    from longctx.models.config import ModelArgs
    from longctx.models.loading import random_model
    from longctx.parallel.layout import Layout
    from longctx.parallel.tensor import valid_degrees
    from longctx.preflight.memory import weight_bytes

    name = model
    args = ModelArgs.from_preset(OmegaConf.load(ROOT / f"conf/model/{name}.yaml"))
    counts = {}
    if weight_bytes(args, torch.bfloat16) < 0.6 * torch.cuda.get_device_properties(0).total_memory:
        for label, tp in (
            ("model as built", None),
            ("through the tensor-parallel path, tp=1", Layout(1, 1).tensor_parallel(args)),
        ):
            built = random_model(args, torch.bfloat16, "cuda", tp=tp)
            counts[label] = graph_kernels(built, 1024)
            del built
            torch.cuda.empty_cache()
    bw = copy_bandwidth()
    results = Path(tempfile.mkdtemp()) / "tp.jsonl"
    n = nproc
    ctx = ["4k", "32k"] if quick else ctx_names
    degrees = [d for d in valid_degrees(args) if d <= n]
    runs = [["attention=global", f"parallel.nproc={d}", f"parallel.tp={d}"] for d in degrees]
    runs += [[f"attention={a}", f"parallel.nproc={n}"] for a in ("star", "ring")] if n > 1 else []
    if n >= 4 and n // 2 in degrees:
        runs += [[f"attention={a}", f"parallel.nproc={n}", f"parallel.tp={n // 2}"] for a in ("star", "ring")]
    commands = _bench_runs(rec, [[*r, f"ctx={c}"] for r in runs for c in ctx], results, name, "tp")
    table = Table(
        f"{name} shapes on {n} GPU{'s' * (n > 1)}: tensor parallel inside one host against star and ring across GPUs",
        "\n".join(commands),
        [
            "attention",
            "GPUs",
            "hosts × tp",
            "context",
            "TTFT (s)",
            "decode (tok/s)",
            "bound (tok/s)",
            "% of bound",
            "peak GPU memory per rank (GiB)",
            "peak host memory per rank (GiB)",
        ],
    )
    table.figure = f"tp-{name}-{n}gpu"
    embedding = args.vocab_size * args.dim * 2  # one row of it is read per token
    for r in map(json.loads, results.read_text().splitlines()) if results.is_file() else []:
        kv = 2 * args.n_layers * max(1, args.n_kv_heads // r["tp"]) * args.head_dim * 2 * r["ctx"] // r["hosts"]
        bound = bw / (weight_bytes(args, torch.bfloat16, r["tp"]) - embedding + kv)
        table.rows.append(
            [
                r["attention"],
                r["ranks"],
                f"{r['hosts']} × {r['tp']}",
                r["ctx"],
                r["ttft_s"],
                r["decode_tok_s"],
                bound,
                100 * r["decode_tok_s"] / bound,
                ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"]),
                ", ".join(f"{p / 2**30:.1f}" for p in r["peak_host_bytes_per_rank"]),
            ]
        )
    table.notes.append(
        f"Random weights, bf16, one warm-up run, 16 new tokens. Decode runs as CUDA graphs in every row (the "
        f"tensor-parallel all-reduces captured with the rest). Bound: copy bandwidth {bw / 1e12:.2f} TB/s over the bytes "
        "one rank reads per token (its weights, the input embedding excluded, and its share of the KV cache); for star "
        "and ring the rank holding the most KV."
        + (
            " Kernels per replayed decode step (1,024-token prompt, one GPU): "
            + "; ".join(f"{k}: {v}" for k, v in counts.items())
            + "."
            if counts
            else ""
        )
    )
    return [table]


# --- hosts of GPUs: star against ring as they grow, 70B with tensor parallelism


CTX_TOKENS = {
    "4k": 4 * K,
    "8k": 8 * K,
    "16k": 16 * K,
    "32k": 32 * K,
    "64k": 64 * K,
    "128k": 128 * K,
    "256k": 256 * K,
    "512k": 512 * K,
    "1m": 1024 * K,
}


def _bench_runs(rec: Recorder, runs: list[list[str]], results: Path, model: str, part: str) -> list[str]:
    """Each run through `runner.py task=bench`, its record emitted (`--jsonl`) as soon as it ends, so that a
    measurement cut short keeps what it measured. A run whose memory plan does not fit the GPU is not started; the
    commands, with why a run is missing, are returned for the table."""
    from hydra import compose, initialize_config_dir

    from longctx.preflight import memory

    commands = []
    for run in runs:
        overrides = [
            "task=bench",
            f"model={model}",
            *run,
            "task.new_tokens=16",
            "task.repeats=1",
            "task.warmup=1",
            "wandb.mode=disabled",
        ]
        commands.append(" ".join(["python runner.py", *overrides]))
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            plan = memory.plan_config(compose("config", overrides=overrides))
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else math.inf
        if plan.need > total:
            commands[-1] += f"   # not run: needs {plan.need / 2**30:.0f} GiB per GPU of {total / 2**30:.0f}"
            continue
        seen = len(results.read_text().splitlines()) if results.is_file() else 0
        done = subprocess.run(
            [sys.executable, "runner.py", *overrides, f"task.results_file={results}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        print(done.stderr[-2000:], flush=True)
        if done.returncode:
            commands[-1] += f"   # failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"
        for line in results.read_text().splitlines()[seen:] if results.is_file() else []:
            rec.emit(json.loads(line), part=part)
    return commands


def bench_hosts(rec: Recorder, model: str, nproc: int, ctx_names: list[str], quick: bool = False) -> list[Table]:
    """Star against ring as hosts grow, one GPU per host: star with one block per GPU and with a quarter of
    the context per block, both anchor modes, and ring, at each of `ctx_names` on `nproc` GPUs."""
    n, results = nproc, Path(tempfile.mkdtemp()) / "hosts.jsonl"
    runs = []
    for name in ctx_names:
        L = CTX_TOKENS[name]
        for block, mode in itertools.product(dict.fromkeys((-(-L // n), -(-L // 4))), ("broadcast", "recompute")):
            runs.append(
                [
                    f"ctx={name}",
                    "attention=star",
                    f"attention.params.block_size={block}",
                    f"attention.params.anchor_mode={mode}",
                    f"parallel.nproc={n}",
                ]
            )
        runs.append([f"ctx={name}", "attention=ring", f"parallel.nproc={n}"])
    name = model
    commands = _bench_runs(rec, runs, results, name, "hosts")
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    table = Table(
        f"{name} shapes on {n} GPUs: star against ring as the hosts grow",
        "\n".join(commands),
        [
            "attention",
            "block",
            "blocks",
            "anchor",
            "context",
            "TTFT (s)",
            "ring / star",
            "≈ P/3 (attention only)",
            "decode (tok/s)",
            "peak GPU memory per rank (GiB)",
        ],
    )
    table.figure = f"hosts-{name}-{n}gpu"
    ring = {r["ctx"]: r["ttft_s"] for r in records if r["attention"] == "ring"}
    for r in records:
        star = r["attention"] == "star"
        blocks = -(-r["ctx"] // r["block_size"]) if star else float("nan")
        table.rows.append(
            [
                r["attention"],
                r.get("block_size", "–") if star else "–",
                blocks,
                r.get("anchor_mode", "–") if star else "–",
                r["ctx"],
                r["ttft_s"],
                ring.get(r["ctx"], float("nan")) / r["ttft_s"] if star else float("nan"),
                blocks / 3 if star else float("nan"),
                r["decode_tok_s"],
                ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"]),
            ]
        )
    table.notes.append(
        "Random weights, bf16, one warm-up run; TTFT covers phase 1 and phase 2 up to the first token. With P equal "
        "blocks, star's phase-1 attention is about P/3 of a balanced ring's (each block sees itself and the anchor, "
        "where the ring's tokens see on average half of the context); the linear layers are the same work in both."
    )
    return [table]
