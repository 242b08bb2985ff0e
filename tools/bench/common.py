"""What every benchmark shares: the table it publishes, timing on a GPU, the Llama-3.1-8B shape, the JSON rows it
records, and how a table becomes its figure's current one in BENCHMARKS.md."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from longctx.models.config import ModelArgs

ROOT = Path(__file__).resolve().parent.parent.parent
K = 1024


@dataclass
class Table:
    title: str
    command: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figure: str = ""  # which figure of BENCHMARKS.md this table is the current one of (`publish`)

    def markdown(self) -> str:
        head = f"## {time.strftime('%Y-%m-%d')} · {self.title} · {device_name()} · torch {torch.__version__}\n\n"
        lines = [
            f"```bash\n{self.command}\n```\n",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in self.rows]
        return head + "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in self.notes)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def per_gpu(figure: str) -> str:
    """`figure` named for this GPU model, for a figure whose table each GPU model keeps one of (an H100's and an
    H200's side by side)."""
    return figure + "-" + re.sub(r"[^a-z0-9]+", "-", device_name().lower().removeprefix("nvidia ")).strip("-")


def fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def timed(fn: Callable, iters: int = 10) -> float:
    """Seconds per call, calls launched back to back (host launch cost included where it exceeds the GPU time)."""
    fn()
    fn()  # a second warm-up: some first calls leave lazy work (recompiles, caches) to the next
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def graph_timed(fn: Callable, iters: int = 10) -> float:
    """Seconds per call, `iters` calls captured in one CUDA graph and replayed: GPU time without launch cost."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return timed(graph.replay, 3) / iters


def matmul_peak(n: int = 8192) -> float:
    """bf16 matmul FLOP/s of this GPU, an n³ product timed."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, 20)


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write), the practical bandwidth ceiling."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() / timed(lambda: y.copy_(x), 20)
    del x, y
    return bw


def timed_generation(
    model, prompt: list[int], new: int, context_len: int, after_first: Callable | None = None, ahead: bool = True
) -> tuple[float, float]:
    """(seconds to the first token, steady-state decode tok/s) of one generation of `new` tokens (at least 4).

    Decode is timed from the fourth token on: the second runs eagerly (it may compile for the cache's size) and the
    third captures the step's CUDA graph; every later one replays it. `after_first(model)` runs after the first
    token, untimed, before the first decode step. `ahead`: `generate_tokens`'s.
    """
    from longctx.models.generate import generate_tokens

    if new < 4:
        raise ValueError(f"timed_generation needs at least 4 new tokens to time a replayed decode step; got {new}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    it = generate_tokens(model, prompt, new, context_len=context_len, ahead=ahead)
    next(it)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    if after_first is not None:
        after_first(model)
    next(it), next(it)  # the eager step and the capture
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    n = sum(1 for _ in it)
    torch.cuda.synchronize()
    return ttft, n / (time.perf_counter() - t1)


def llama3_args(max_seq_len: int) -> tuple[ModelArgs, dict]:
    """Llama-3.1-8B's shape (conf/model/llama3.yaml), with at least `max_seq_len` positions, and its HF config."""
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/llama3.yaml").config)
    args = ModelArgs.from_hf(preset)
    return replace(args, max_seq_len=max(args.max_seq_len, max_seq_len)), preset


@dataclass
class Recorder:
    """Every row a benchmark measures, also written as a JSON line to `jsonl` (where given) as soon as it is made."""

    jsonl: Path | None = None

    def emit(self, row: dict, **extra) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({**row, **extra, "device": device_name(), "torch": torch.__version__}) + "\n")


def publish(doc: str, section: str, figure: str) -> str:
    """`doc` (BENCHMARKS.md's text) with `section` as the current table of `figure`: it takes the place of the one it
    replaces (git keeps that one); a new figure goes after the others."""
    marker = f"<!-- figure: {figure} -->"
    new = f"{marker}\n\n{section.strip()}\n\n"
    if marker not in doc:
        return doc.rstrip("\n") + "\n\n" + new.rstrip("\n") + "\n"
    head, rest = doc.split(marker, 1)
    nxt = rest.find("<!-- figure: ")
    tail = rest[nxt:] if nxt >= 0 else ""
    return (head + new + tail).rstrip("\n") + "\n"
