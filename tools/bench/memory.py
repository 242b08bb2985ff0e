"""The memory plan against the measured peak: `runner.py task=bench` for each model, strategy and context (on GPUs or
on the CPU), the plan's peak per rank beside the measured one."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longctx.tools.bench.common import ROOT, K, Recorder, Table


def bench_memory(
    rec: Recorder,
    models: list[str],
    strategies: list[str],
    nproc: int,
    lengths: list[int] | None = None,
    longest: int = 256 * K,
    quick: bool = False,
) -> list[Table]:
    """runner.py task=bench for each model, strategy and context: the plan's peak per rank next to the measured one
    (the CUDA allocator's peak on a GPU; on CPU, the process's max resident memory against the plan with its
    runtime term). On a GPU, then the headline command, which must be refused in seconds."""
    results = Path(tempfile.mkdtemp()) / "memory.jsonl"
    cuda = torch.cuda.is_available()
    lengths = list(map(str, lengths or ([64 * K] if quick else [64 * K, 128 * K, longest])))
    commands = []
    for model, attention in itertools.product(models, strategies):
        argv = [
            sys.executable,
            "runner.py",
            "-m",
            "task=bench",
            f"model={model}",
            f"attention={attention}",
            f"ctx.length={','.join(lengths)}",
            f"parallel.nproc={nproc}",
            "task.new_tokens=8",
            "task.warmup=0",
            "task.repeats=1",
            "wandb.mode=disabled",
            f"task.results_file={results}",
        ]
        commands.append(" ".join(["python"] + argv[1:-1]))
        subprocess.run(argv, cwd=ROOT, check=True)
    where = f"{nproc} GPU{'s' * (nproc > 1)}" if cuda else "CPU"
    table = Table(
        f"the memory plan against the measured peak on {where}",
        "\n".join(commands),
        [
            "model",
            "attention",
            "ranks",
            "rank",
            "context",
            "planned peak (GiB)",
            "measured peak (GiB)",
            "planned / measured",
            "TTFT (s)",
        ],
    )
    table.figure = f"memory-{nproc}gpu" if cuda else "memory-cpu"
    for r in map(json.loads, results.read_text().splitlines()):
        for rank, (planned, peak) in enumerate(zip(r["planned_peak_bytes_per_rank"], r["peak_mem_bytes_per_rank"])):
            row = [
                r["model"],
                r["attention"],
                r["ranks"],
                rank,
                r["ctx"],
                planned / 2**30,
                peak / 2**30,
                planned / peak,
                r["ttft_s"],
            ]
            table.rows.append(row)
        rec.emit(r, part="memory")
    if not cuda:
        table.notes.append(
            "Real checkpoints, fp32. Measured: the process's max resident memory (`ru_maxrss`); planned: the tensor "
            "terms of `python runner.py task=plan` for the same run plus its CPU runtime term."
        )
        return [table]
    table.notes.append(
        "Random weights, bf16, no warm-up (compilation included in the peak). Measured: `torch.cuda.max_memory_allocated`"
        " over the run; planned: the tensor terms of `python runner.py task=plan` for the same run (without the 5% slack"
        " and the CUDA context that the check before loading adds)."
    )
    start = time.perf_counter()
    refused = subprocess.run(
        [sys.executable, "runner.py", "model=llama3", "attention=star", "ctx=1m", "task=bench", "wandb.mode=disabled"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    table.notes.append(
        f"The headline command `python runner.py model=llama3 attention=star ctx=1m task=bench` on this GPU: exit code "
        f"{refused.returncode} after {seconds:.1f} s with\n\n> {refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else '(no message)'}"
    )
    return [table]
