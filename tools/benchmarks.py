"""The GPU benchmark matrix: prints each table and appends it, dated, to BENCHMARKS.md.

    python tools/benchmarks.py decode [--tune]       # decode attention: Lean kernel vs SDPA vs a fixed split
    python tools/benchmarks.py prefill [--tune]      # phase-1 attention: fused SDPA kernels vs FlexAttention by shape
    python tools/benchmarks.py model [--ctx 4096,65536]   # Llama-3.1-8B shapes, batch-1 decode vs transformers generate
    python tools/benchmarks.py gemv                  # batch-1 projections: weights stored row- vs column-major
    python tools/benchmarks.py ttft --nproc 4 --ctx 64k,128k   # star vs ring time to first token (runner.py -m)
    python tools/benchmarks.py memory --longest 294912   # the memory plan against the measured peak (runner.py)
    python tools/benchmarks.py tp --nproc 2          # tensor parallel on one host vs star/ring over the GPUs
    python tools/benchmarks.py hosts --nproc 8 --ctx-names 128k,512k,1m   # star vs ring as hosts grow
    python tools/benchmarks.py memory --models smollm2,gemma3_270m --lengths 8192 --nproc 1   # the same on CPU

Parts combine (`decode prefill model`). Each table becomes the current one of its figure in `--append FILE` (default
BENCHMARKS.md; `-` for none): it replaces the figure's previous table, which moves to the history at the end of the
file (`publish`). `--jsonl FILE` also writes every row as JSON. Timings are CUDA-event times after a warm-up; "graph" times
replay the calls from a CUDA graph, which is how decode runs in the model, so they leave out Python launch cost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

from longctx.attention import lean
from longctx.attention.kernels import PositionMask, _compiled_flex, flex_options
from longctx.parallel.launch import MULTICAST_OFF

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
        head = f"## {time.strftime('%Y-%m-%d')} · {self.title} · {_device_name()} · torch {torch.__version__}\n\n"
        lines = [f"```bash\n{self.command}\n```\n", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in self.rows]
        return head + "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in self.notes)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


# --- timing


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


def timed_generation(model, prompt: list[int], new: int, context_len: int, after_first: Callable | None = None) -> tuple[float, float]:
    """(seconds to the first token, steady-state decode tok/s) of one generation of `new` tokens (at least 4).

    Decode is timed from the fourth token on: the second runs eagerly (it may compile for the cache's size) and the
    third captures the step's CUDA graph; every later one replays it. `after_first(model)` runs after the first
    token, untimed, before the first decode step.
    """
    from longctx.models.generate import generate_tokens

    if new < 4:
        raise ValueError(f"timed_generation needs at least 4 new tokens to time a replayed decode step; got {new}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    it = generate_tokens(model, prompt, new, context_len=context_len)
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


# --- decode attention


def _decode_inputs(B: int, hkv: int, group: int, S: int):
    q = torch.randn(B, hkv * group, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, hkv, S, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return q, k, v, PositionMask(torch.tensor([S - 1], device="cuda"), torch.arange(S, device="cuda"))


TUNE_SHAPES = [(1, 1, 8, 32 * K), (1, 8, 4, 32 * K), (8, 8, 4, 8 * K), (1, 8, 4, 128 * K), (1, 1, 8, 256 * K), (2, 4, 4, 1024 * K)]


def tune_lean() -> tuple[lean.LeanConfig, Table]:
    """Every launch setting on a few shapes; the best geometric-mean time becomes lean.CONFIG for this run."""
    table = Table("Lean decode kernel launch settings", "python tools/benchmarks.py decode --tune",
                  ["block_n", "warps", "stages", "programs/SM", "min tiles", *[f"B{b} kv{h} g{g} {s // K}K (µs)" for b, h, g, s in TUNE_SHAPES], "geomean (µs)"])  # fmt: skip
    table.figure = "lean-tune"
    inputs = [_decode_inputs(*shape) for shape in TUNE_SHAPES]
    results = []
    for block_n, warps, stages, per_sm, min_tiles in itertools.product((64, 128), (4, 8), (3, 4), (1, 2), (1, 4, 8)):
        lean.CONFIG = lean.LeanConfig(block_n, warps, stages, per_sm, min_tiles)
        lean.default_programs.cache_clear()
        try:
            times = [graph_timed(lambda: lean.lean_attend(q, k, v, m)) * 1e6 for q, k, v, m in inputs]
        except Exception as e:  # a setting that does not fit (shared memory) is reported, not fatal
            print(f"skip {lean.CONFIG}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        results.append((math.exp(sum(map(math.log, times)) / len(times)), lean.CONFIG, times))
        print(f"{lean.CONFIG} {' '.join(f'{t:8.1f}' for t in times)}", flush=True)
    results.sort(key=lambda r: r[0])
    for mean, c, times in results[:8]:
        table.rows.append([c.block_n, c.warps, c.stages, c.programs_per_sm, c.min_tiles, *times, mean])
    best = results[0][1]
    table.notes.append(f"The best {len(table.rows)} of {len(results)} settings; the sweep below runs with {best}.")
    lean.CONFIG = best
    lean.default_programs.cache_clear()
    del inputs
    return best, table


def bench_decode(quick: bool) -> list[Table]:
    tables = []
    if ARGS.tune:
        tables.append(tune_lean()[1])
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = Table(
        "decode attention over a long KV cache: Lean kernel vs SDPA vs fixed split",
        "python tools/benchmarks.py decode" + (" --tune" if ARGS.tune else ""),
        ["batch", "KV heads", "group", "context", "KV MB", "Lean graph (µs)", "% of copy", "Lean eager (µs)",
         "SDPA graph (µs)", "Lean / SDPA", "fixed split graph (µs)", "stream-K gain", "max abs diff"],
    )  # fmt: skip
    table.figure = "decode"
    table.notes.append(
        f"bf16, head dim 128, one query token; copy bandwidth {bw / 1e12:.2f} TB/s measured in the same run; {sms} SMs; "
        f"{lean.CONFIG}. Lean returns the log-sum-exp as well (SDPA does not). \"Fixed split\" runs the same kernel with "
        "every head cut into the same number of splits (FlashDecoding-style), not stream-K. \"Lean / SDPA\" > 1 means "
        "Lean is faster. Graph times replay 10 calls from a CUDA graph; eager times launch them from Python."
    )
    batches, heads, contexts = ((1, 8), ((1, 8), (8, 4)), (8 * K, 32 * K, 128 * K, 1024 * K)) if quick else \
        ((1, 2, 8), ((1, 8), (2, 4), (8, 4)), (8 * K, 32 * K, 128 * K, 256 * K, 1024 * K))  # fmt: skip
    for B, (hkv, group), S in itertools.product(batches, heads, contexts):
        q, k, v, mask = _decode_inputs(B, hkv, group, S)
        nbytes = 2 * k.numel() * k.element_size()
        graph = graph_timed(lambda: lean.lean_attend(q, k, v, mask))
        eager = timed(lambda: lean.lean_attend(q, k, v, mask))
        sdpa = graph_timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        n_heads = B * hkv
        splits = max(1, lean.default_programs(q.device) // n_heads)
        fixed = graph_timed(lambda: lean.lean_attend(q, k, v, mask, programs=n_heads * splits))
        diff = (lean.lean_attend(q, k, v, mask)[0].float() - F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()).abs().max().item()
        row = [B, hkv, group, S, nbytes / 1e6, graph * 1e6, 100 * nbytes / graph / bw, eager * 1e6, sdpa * 1e6,
               sdpa / graph, fixed * 1e6, fixed / graph, f"{diff:.1e}"]  # fmt: skip
        table.rows.append(row)
        emit(dict(zip(["batch", "kv_heads", "group", "context", "kv_mb", "lean_graph_us", "pct_copy", "lean_eager_us", "sdpa_graph_us",
                       "lean_over_sdpa", "fixed_graph_us", "streamk_gain", "max_abs_diff"], row[:-1] + [diff])), part="decode")  # fmt: skip
        del q, k, v
    return tables + [table]


# --- sparse decode (HSR)


def _planted_cache(k: torch.Tensor, direction: torch.Tensor, hot: torch.Tensor, block: int, strength: float = 16.0):
    """Keys (in place) whose blocks `hot` score about +strength against a query along `direction` [B, Hkv, 1, D]
    and the others about -strength, with per-channel noise 0.1; and the summary of the whole (full) cache."""
    from longctx.attention.hsr import KeySummary

    B, H, S, D = k.shape
    nb = S // block
    k.normal_().mul_(0.1).sub_(strength * direction)
    k.view(B, H, nb, block, D)[:, :, hot] += 2 * strength * direction[:, :, None]
    blocks = k.view(B, H, nb, block, D)
    count = torch.full((nb,), block, device=k.device)
    starts = torch.arange(nb, device=k.device) * block
    return KeySummary(block, blocks.amin(3), blocks.amax(3), count, starts, starts + block - 1, torch.zeros(B, H, dtype=torch.int32, device=k.device))


def bench_hsr(quick: bool) -> list[Table]:
    from longctx.attention.hsr import PROBE_EVERY, hsr_attend

    eps, block, sink, recent = 1e-3, 64, 64, 256
    table = Table(
        "HSR sparse decode attention vs dense Lean and SDPA, by share of key blocks read",
        "python tools/benchmarks.py hsr",
        ["batch", "context", "KV MB", "blocks planted", "blocks read", "HSR graph (µs)", "HSR selecting every call (µs)",
         "of which selection (µs)", "Lean graph (µs)", "SDPA graph (µs)", "Lean / HSR", "SDPA / HSR", "largest certificate",
         "max abs diff vs Lean"],
    )  # fmt: skip
    table.figure = "hsr"
    table.notes.append(
        f"bf16, 8 KV heads x 4 query heads (Llama-3.1-8B's attention), head dim 128, one query token; hsr_eps {eps}, "
        f"hsr_block {block}, sink {sink}, recent {recent}. Keys are planted so that the share of blocks in 'blocks "
        "planted' (spread evenly) scores about +16 against the query and the rest about -16, each key with noise 0.1 "
        "per channel: what a certified selection must read is then known. 'blocks read' is what HSR read (the planted "
        "ones, the sink and recent blocks, the best-bound block). 'HSR graph' is the steady state of repeated calls "
        f"(a graph of {PROBE_EVERY} calls replayed, the query position advancing by one a call, that step's own time "
        "subtracted): a head whose selection read at least 15/16 of its blocks twice in "
        f"a row reads all of them, without selecting, for the next {PROBE_EVERY - 1} calls (attention/hsr.py). 'selecting every call' clears "
        "that state before each call (the clearing's own time subtracted). 'of which selection' is that time less "
        "the final read's alone (score bounds, the first read, the weights' histogram and cut, the tile list). Lean and "
        "SDPA graphs replay 10 calls."
    )
    shares = (0.01, 0.05, 0.25, 1.0) if quick else (0.01, 0.05, 0.10, 0.25, 1.0)
    for B, S in ((1, 32 * K), (1, 128 * K), (1, 1024 * K), (8, 32 * K), (8, 128 * K)) + (() if quick else ((8, 1024 * K),)):
        q, k, v, mask = _decode_inputs(B, 8, 4, S)
        direction = torch.nn.functional.normalize(torch.randn(B, 8, 1, 128, device="cuda"), dim=-1).to(k.dtype)
        q.copy_((direction * 128**0.5).repeat_interleave(4, dim=1) + 0.05 * torch.randn_like(q))
        nbytes = 2 * k.numel() * k.element_size()
        dense = graph_timed(lambda: lean.lean_attend(q, k, v, mask))
        sdpa = graph_timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        nb = S // block
        advance = graph_timed(lambda: mask.q_pos.add_(1), PROBE_EVERY)
        for share in shares:
            mask.q_pos.fill_(S - 1)
            hot = torch.arange(0, nb, max(1, round(1 / share)), device="cuda")
            summary = _planted_cache(k, direction, hot, block)
            r = hsr_attend(q, k, v, mask, summary, eps, sink, recent)
            # the final read alone, of as many blocks per head (which blocks matters little to the time)
            tiles = torch.arange(nb, device="cuda", dtype=torch.int32).expand(B * 8, nb).contiguous()
            n = r.blocks_read.view(-1).int()
            # decode steps: the query position advances (that step's own cost subtracted), which ends the runs
            t = graph_timed(lambda: (hsr_attend(q, k, v, mask, summary, eps, sink, recent), mask.q_pos.add_(1)), PROBE_EVERY) - advance
            mask.q_pos.fill_(S - 1)
            clear = graph_timed(summary.dense_until.zero_, PROBE_EVERY)
            selecting = graph_timed(lambda: (summary.dense_until.zero_(), hsr_attend(q, k, v, mask, summary, eps, sink, recent)), PROBE_EVERY) - clear
            final = graph_timed(lambda: lean.lean_sparse_attend(q, k, v, mask, tiles, n, block))
            read = float(r.blocks_read.float().mean() / r.blocks_visible)
            diff = (r.out.float() - lean.lean_attend(q, k, v, mask)[0].float()).abs().max().item()
            row = [B, S, nbytes / 1e6, f"{len(hot) / nb:.1%}", f"{read:.1%}", t * 1e6, selecting * 1e6, (selecting - final) * 1e6,
                   dense * 1e6, sdpa * 1e6, dense / t, sdpa / t, f"{float(r.certificate.max()):.1e}", f"{diff:.1e}"]  # fmt: skip
            table.rows.append(row)
            emit(dict(zip(["batch", "context", "kv_mb", "planted", "read_share", "hsr_graph_us", "selecting_us", "selection_us",
                           "lean_graph_us", "sdpa_graph_us", "lean_over_hsr", "sdpa_over_hsr", "max_certificate", "max_abs_diff"],
                          row[:3] + [len(hot) / nb, read] + row[5:12] + [float(r.certificate.max()), diff])), part="hsr")  # fmt: skip
            print(table.rows[-1], flush=True)
            if ARGS.profile and share == 0.05:
                table.notes.append(_profile_hsr(lambda: hsr_attend(q, k, v, mask, summary, eps, sink, recent), f"batch {B}, context {S:,}, 5%"))
            del summary, r
        del q, k, v
        torch.cuda.empty_cache()
    return [table]


def _plant_model_cache(model, share: float, strength: float = 128.0) -> None:
    """Rewrite every layer's cached keys (in place, summaries too) so that a known share of key blocks matters to any
    query: between the sink blocks and the last 1,024 slots, every (1/share)-th block holds keys +-strength x a
    random unit vector (pairs of opposite signs, so some key of the block scores high whatever the query) and every
    other block holds zero keys (score exactly 0). Values, the sink and the recent tokens stay as computed."""
    strategy, n = model.attention, model.cache_len
    block = strategy.hsr_block
    first, last = -(-strategy.hsr_sink // block), (n - 1024) // block
    device = model.kv_pos.device
    filled = model.kv_pos >= 0
    slots = torch.arange(filled.numel(), device=device)
    hot = torch.arange(first, last, max(1, round(1 / share)), device=device)
    gen = torch.Generator(device).manual_seed(0)
    for layer in model.layers:
        cache = layer.attention.kv_cache
        B, H, _, D = cache.k_cache.shape
        blocks = cache.k_cache[:, :, : last * block].view(B, H, last, block, D)
        blocks[:, :, first:] = 0
        u = F.normalize(torch.randn(B, H, len(hot), block // 2, D, device=device, generator=gen), dim=-1) * strength
        blocks[:, :, hot] = torch.cat((u, -u), dim=3).to(blocks.dtype)
        if cache.summary is not None:  # (decode=hsr) the graph to be captured reads these very tensors: refill them
            cache.summary.reset()
            cache.summary.update(slots[filled], cache.k_cache[:, :, filled], model.kv_pos[filled])
    if strategy.hsr_stats is not None:
        strategy.hsr_stats.zero_()  # count decode steps over the planted cache only


def bench_hsr_model(quick: bool) -> list[Table]:
    """Batch-1 decode of Llama-3.1-8B shapes (random weights) with decode=dense and decode=hsr after the same
    prompt: over the cache as the model computed it (not with `quick`), and over one planted so that 5% of key
    blocks matter."""
    from longctx import attention
    from longctx.models.generate import generate_tokens
    from longctx.models.loading import random_model

    new, planted = 32, 0.05
    table = Table(
        "Llama-3.1-8B shapes, batch-1 decode, dense vs HSR sparse decode (random weights)",
        "python tools/benchmarks.py hsr-model --contexts " + ARGS.contexts + (" --quick" if quick else ""),
        ["context", "phase 1", "KV cache", "decode", "decode (tok/s)", "blocks read", "largest certificate", "HSR / dense"],
    )
    table.figure = "hsr-model-" + re.sub(r"[^a-z0-9]+", "-", _device_name().lower().removeprefix("nvidia "))  # one per GPU model
    table.notes.append(
        f"bf16, {new} new tokens, CUDA-graph decode (tok/s over the replayed steps: `timed_generation`), hsr_eps 1e-3, hsr_block 64, sink 64, "
        "recent 256. 'as computed': random weights attend almost uniformly, so a certified selection must read nearly "
        "every block; these rows show what HSR's selection costs a step when it saves nothing. "
        f"'{planted:.0%} planted': after the first token and before the first decode step, every layer's cached keys "
        f"are rewritten (`_plant_model_cache`): every {round(1 / planted)}th block between the sink and the last 1,024 "
        "slots holds keys of norm 128 in pairs of opposite sign (some key of it scores high against any query), the "
        "others zero keys; values, sink and recent tokens stay as computed. What a certified selection must read is "
        "then known; dense decode runs over the same cache. Contexts past 128K fill the cache with star's phase 1 "
        "(4 blocks on one rank), which leaves phase 2 as global's."
    )
    for S in (int(x) for x in ARGS.contexts.split(",")):
        args, _ = _llama3_args(S + 1024)
        model = random_model(args, torch.bfloat16, "cuda", attention.build("global"))
        prompt = torch.randint(0, args.vocab_size, (S,), generator=torch.Generator().manual_seed(0)).tolist()
        name, params = ("star", {"block_size": -(-S // 4)}) if S > 128 * K else ("global", {})
        for cache in ((f"{planted:.0%} planted",) if quick else ("as computed", f"{planted:.0%} planted")):
            plant = (lambda m: _plant_model_cache(m, planted)) if cache != "as computed" else None
            rates = {}
            for decode in ("dense", "hsr"):
                model.attention = attention.build(name, **params, decode=decode)
                list(generate_tokens(model, prompt[:4096], new, context_len=4096 - 64))  # compiles the decode step's kernels
                _, rates[decode] = timed_generation(model, prompt, new, S - 64, plant)
                report = model.attention.hsr_report() or {}
                row = [S, name, cache, decode, rates[decode], f"{report['hsr_blocks_read_share']:.1%}" if report else "–",
                       f"{report['hsr_max_certificate']:.1e}" if report else "–", rates[decode] / rates["dense"]]  # fmt: skip
                table.rows.append(row)
                emit(dict(zip(["context", "phase1", "cache", "decode", "tok_s"], row[:5]), **report), part="hsr-model")
                print(row, flush=True)
        del model
        torch.cuda.empty_cache()
    return [table]


def bench_shapes(quick: bool) -> list[Table]:
    """A run over prompts of many lengths, phase 1 on FlexAttention with exact or bucketed shapes, or on the fused
    kernels (the default where they run): graphs compiled, wall time."""
    from torch._dynamo.utils import counters

    from longctx import attention
    from longctx.attention import fused, kernels
    from longctx.models.generate import generate_tokens
    from longctx.models.loading import random_model

    n = 30 if quick else 100
    args, _ = _llama3_args(16 * K)
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
    default, table_default = kernels.FLEX_BUCKETS, dict(fused.FUSED_KERNELS)
    import tempfile

    runs = (("Flex, exact shapes", None, {}), ("Flex, 4 buckets per octave", 4, {}), ("fused (default)", default, table_default))
    for label, buckets, kernel_table in runs:
        # Nothing compiled before serves the run: dynamo reset, empty Inductor and Triton caches (as on a new machine)
        torch._dynamo.reset()
        fresh = tempfile.mkdtemp(prefix="longctx-shapes-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = fresh, os.path.join(fresh, "triton")
        kernels.FLEX_BUCKETS = buckets
        fused.FUSED_KERNELS.clear()
        fused.FUSED_KERNELS.update(kernel_table)
        model = random_model(args, torch.bfloat16, "cuda", attention.build("global"))
        before = counters["stats"]["unique_graphs"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for L in lengths:
            list(generate_tokens(model, torch.randint(0, args.vocab_size, (L,), generator=rng).tolist(), 4))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        row = [label, n, counters["stats"]["unique_graphs"] - before, wall, wall / n]
        table.rows.append(row)
        emit(dict(zip(["shapes", "prompts", "graphs", "wall_s", "s_per_prompt"], row)), part="shapes")
        print(row, flush=True)
        del model
    kernels.FLEX_BUCKETS = default
    fused.FUSED_KERNELS.update(table_default)
    return [table]


def _profile_hsr(step: Callable, title: str) -> str:
    """GPU time per kernel of one HSR step (eager), averaged over 5."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    lines = [f"{e.self_device_time_total / 5:8.1f} µs {e.count // 5:3d}x  {e.key[:80]}" for e in events[:12]]
    text = f"Profile of one HSR step ({title}), GPU time per kernel:\n\n```\n" + "\n".join(lines) + "\n```"
    print(text, flush=True)
    return text


# --- prefill


FLEX_VARIANTS = {  # kernel_options tried against the default (Hopper bf16 d128 default: BLOCK_M 128, BLOCK_N 64, 3 stages, 8 warps)
    "default": None,
    "M128 N128 s2 w8": {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 2, "num_warps": 8},
    "M128 N64 s4 w8": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 4, "num_warps": 8},
    "M128 N64 s3 w4": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3, "num_warps": 4},
    "M64 N128 s3 w4": {"BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 3, "num_warps": 4},
    "default + TMA": {"USE_TMA": True},
    "M128 N128 s2 w8 + TMA": {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 2, "num_warps": 8, "USE_TMA": True},
    "M128 N64 s4 w8 + TMA": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 4, "num_warps": 8, "USE_TMA": True},
    "default + TMA + prescale": {"USE_TMA": True, "PRESCALE_QK": True},
}


def bench_prefill(quick: bool) -> list[Table]:
    """Phase-1 attention by shape: each fused kernel and FlexAttention alone, then the project's `attend`, which
    picks one (attention.fused.FUSED_KERNELS) and splits star's mask into pieces."""
    from longctx.attention import fused
    from longctx.attention.kernels import attend, fused_plan

    table = Table(
        "phase-1 attention by shape: fused SDPA kernels vs compiled FlexAttention, and the path attend() takes",
        "python tools/benchmarks.py prefill",
        ["heads (q/kv, dim)", "mask", "queries", "keys", "cuDNN TFLOP/s", "flash TFLOP/s", "Flex TFLOP/s",
         "attend() path", "attend() TFLOP/s", "attend() / Flex", "max abs diff vs Flex"],
    )  # fmt: skip
    table.figure = "prefill"
    table.notes.append(
        "bf16, batch 1. TFLOP/s counts 4·head dim·query heads per visible (query, key) pair. The fused kernels are "
        "PyTorch's private ops that return the log-sum-exp (`aten._scaled_dot_product_cudnn_attention`, "
        "`_scaled_dot_product_flash_attention`), K/V with their own heads (GQA without copies); '–' where a kernel "
        "does not take the shape (a star mask is pieces). Flex is the compiled FlexAttention path with its BlockMask "
        "built once and excluded (every layer reuses it). 'star, 4 blocks' is one rank holding all four blocks of a "
        "block = anchor = context/4 layout: attend() runs it as one batched causal call and one full call, merged."
    )
    flex = _compiled_flex()
    ops = {"cudnn": fused.cudnn_kernel, "flash": lambda q, k, v, c: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, c, False)[:2]}
    lengths = (32 * K, 128 * K) if quick else (8 * K, 32 * K, 128 * K)
    for (hq, hkv, D), S in itertools.product(((32, 8, 128), (4, 1, 256)), lengths):
        pos = torch.arange(S, device="cuda")
        shapes = {
            "causal": (PositionMask(pos, pos), S * (S + 1) // 2, True),
            "full": (PositionMask(pos + S, pos), S * S, False),
            "star, 4 blocks": (PositionMask(pos, pos, block_size=S // 4, anchor_size=S // 4), 4 * (S // 4) * (S // 4 + 1) // 2 + 3 * (S // 4) ** 2, None),
        }
        q = torch.randn(1, hq, S, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for name, (mask, pairs, causal) in shapes.items():
            tflops = lambda t: 4 * D * hq * pairs / t / 1e12  # noqa: E731
            row = [f"{hq}/{hkv}, {D}", name, S, S]
            for op in ops.values():
                row.append(tflops(timed(lambda: op(q, k, v, causal), 3)) if causal is not None else float("nan"))
            block_mask = mask.block_mask()
            t_flex = timed(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, kernel_options=flex_options(q)), 3)
            plan = fused_plan(q, k, mask)
            path = "Flex" if plan is None else f"{fused.FUSED_KERNELS[torch.cuda.get_device_capability()]}, {len(plan[1])} call(s)"
            t_attend = timed(lambda: attend(q, k, v, mask, return_lse=True), 3)
            diff = (attend(q, k, v, mask).float() - flex(q, k, v, block_mask=block_mask, enable_gqa=True)[0].float()).abs().max().item()
            row += [tflops(t_flex), path, tflops(t_attend), t_flex / t_attend, f"{diff:.1e}"]
            table.rows.append(row)
            emit(dict(zip(["heads", "mask", "queries", "keys", "cudnn_tflops", "flash_tflops", "flex_tflops", "path", "attend_tflops",
                           "attend_over_flex"], row[:-1]), max_abs_diff=diff), part="prefill")  # fmt: skip
            del block_mask
        del q, k, v
    return [table] + ([tune_flex(quick)] if ARGS.tune else [])


def tune_flex(quick: bool) -> Table:
    """FlexAttention's kernel options on causal prefill, against SDPA (`prefill --tune`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = Table(
        "causal prefill attention: FlexAttention kernel options vs SDPA",
        "python tools/benchmarks.py prefill --tune",
        ["context", "SDPA backend", "SDPA TFLOP/s", "flex variant", "flex TFLOP/s", "flex / SDPA", "star mask (4 blocks) speed-up"],
    )
    table.figure = "flex-tune"
    table.notes.append(
        "bf16, batch 1, 32 query / 8 KV heads, head dim 128. TFLOP/s counts the causal half: 2·Hq·D·S². SDPA gets "
        "K/V repeated to 32 heads; the fastest of its cuDNN and flash backends is shown. Flex runs through the "
        "project's own path (BlockMask from token positions, built once and excluded, as every layer reuses it) and "
        "returns the log-sum-exp; the star column is the fastest variant's causal time over its star-mask time."
    )
    project = {"project's options": flex_options(torch.empty(1, device="cuda", dtype=torch.bfloat16))}
    variants = {**FLEX_VARIANTS, **project}
    flex = _compiled_flex()
    for S in (32 * K, 128 * K) if quick else (8 * K, 32 * K, 64 * K, 128 * K):
        q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 2 * 32 * 128 * S * S
        kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        sdpa = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    sdpa[name] = timed(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), 3)
            except RuntimeError as e:
                print(f"SDPA {name} unavailable: {str(e)[:80]}", flush=True)
        backend, t_sdpa = min(sdpa.items(), key=lambda x: x[1])
        del kr, vr
        pos = torch.arange(S, device="cuda")
        causal = PositionMask(pos, pos).block_mask()
        star = PositionMask(pos, pos, block_size=S // 4, anchor_size=S // 4).block_mask()
        times = {}
        for name, opts in variants.items():
            try:
                times[name] = timed(lambda: flex(q, k, v, block_mask=causal, enable_gqa=True, return_lse=True, kernel_options=opts), 3)
            except Exception as e:
                print(f"flex {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        fastest = min(times, key=times.get)
        t_star = timed(lambda: flex(q, k, v, block_mask=star, enable_gqa=True, return_lse=True, kernel_options=variants[fastest]), 3)
        for name, t in sorted(times.items(), key=lambda x: x[1]):
            row = [S, backend, flops / t_sdpa / 1e12, name, flops / t / 1e12, t_sdpa / t, times[fastest] / t_star if name == fastest else float("nan")]
            table.rows.append(row)
            emit(dict(zip(["context", "sdpa_backend", "sdpa_tflops", "flex_variant", "flex_tflops", "flex_over_sdpa", "star_speedup"], row)), part="flex-tune")  # fmt: skip
        del q, k, v
    return table


# --- whole model decode


def _llama3_args(max_seq_len: int):
    from omegaconf import OmegaConf

    from longctx.models.config import ModelArgs

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/llama3.yaml").config)
    args = ModelArgs.from_hf(preset)
    return replace(args, max_seq_len=max(args.max_seq_len, max_seq_len)), preset


def bench_model(quick: bool) -> list[Table]:
    """Batch-1 decode of Llama-3.1-8B shapes (random weights) after prompts of each `--ctx` length; transformers in
    the same run."""
    from longctx import attention
    from longctx.models import transformer
    from longctx.models.loading import random_model

    contexts, new = [int(c) for c in str(ARGS.ctx).split(",")], 64
    args, preset = _llama3_args(max(contexts) + 4096)
    model = random_model(args, torch.bfloat16, "cuda", attention.build("global"))
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    table = Table(
        f"Llama-3.1-8B shapes, batch-1 decode after a prompt of {' or '.join(f'{S:,}' for S in contexts)} tokens, vs transformers generate",
        f"python tools/benchmarks.py model --ctx {ARGS.ctx}" + (" --profile" if ARGS.profile else ""),
        ["engine", "attention", "context", "TTFT (s)", "decode (tok/s)", "bound (tok/s)", "% of bound", "vs transformers"],
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
            transformer.COMPILE_ELEMENTWISE = fused
            for attempt in range(2):  # the first run compiles
                model.attention = attention.build(name, **params)
                ttft, rate = timed_generation(model, prompt, new, S - 64)
            engine = "longctx (CUDA graphs)" if fused else "longctx (CUDA graphs), norm/rotary/SwiGLU not compiled"
            rows.append([engine, name, S, ttft, rate])
        transformer.COMPILE_ELEMENTWISE = True
        if ARGS.profile:
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
            emit(dict(zip(["engine", "attention", "ctx", "ttft_s", "decode_tok_s"], r), bound_tok_s=bound), part="model")
    return [table]


def bench_gemv(quick: bool) -> list[Table]:
    """Batch-1 projections of Llama-3.1-8B shapes with the weight stored row-major (as checkpoints are) or
    column-major: the measurement behind `models.loading.COLUMN_MAJOR`."""
    from longctx.models.loading import COLUMN_MAJOR

    args, _ = _llama3_args(0)
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"attention.wqkv": (q + 2 * kv, args.dim), "attention.wo": (args.dim, q),
              "feed_forward.w13": (2 * args.intermediate_size, args.dim), "feed_forward.w2": (args.dim, args.intermediate_size),
              "output": (args.vocab_size, args.dim)}  # fmt: skip
    chosen = COLUMN_MAJOR.get(torch.cuda.get_device_capability(), ())
    table = Table("batch-1 projections (GEMV) of Llama-3.1-8B shapes: weights stored row-major vs column-major",
                  "python tools/benchmarks.py gemv",
                  ["projection", "weight", "row-major (µs)", "TB/s", "column-major (µs)", "TB/s", "column / row speed", "stored column-major"])  # fmt: skip
    table.figure = "gemv"
    bw = copy_bandwidth()
    table.notes.append(
        f"bf16, x [1, 1, in] @ Wᵀ through F.linear. Each weight is one of as many copies as exceed 256 MB, called in "
        f"turn, so that reads come from HBM as in a decode step (not from the 50 MB L2); graph times. Copy bandwidth "
        f"{bw / 1e12:.2f} TB/s in the same run. \"stored column-major\": `models.loading.COLUMN_MAJOR` for this GPU."
    )
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        rows = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        cols = [w.t().contiguous().t() for w in rows]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        t_row = graph_timed(lambda: [F.linear(x, w) for w in rows]) / copies
        t_col = graph_timed(lambda: [F.linear(x, w) for w in cols]) / copies
        row = [name, f"{n:,} x {k:,}", t_row * 1e6, nbytes / t_row / 1e12, t_col * 1e6, nbytes / t_col / 1e12, t_row / t_col,
               "yes" if name in chosen else "no"]  # fmt: skip
        table.rows.append(row)
        emit(dict(zip(["projection", "shape", "row_us", "row_tbs", "col_us", "col_tbs", "col_speedup", "chosen"], row)), part="gemv")
        del rows, cols
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
    text = f"Profile of eager decode steps: {total / 3 / 1e3:.2f} ms of GPU time per token in {kernels} kernels.\n\n```\n" + "\n".join(lines) + "\n```"
    print(text, flush=True)
    return text


# --- time to first token over several GPUs


def bench_ttft(quick: bool) -> list[Table]:
    """star vs ring through the runner (one process per GPU), block = context / 4."""
    results = Path(tempfile.mkdtemp()) / "ttft.jsonl"
    argv = [sys.executable, "runner.py", "-m", "task=bench", "model=llama3", f"attention={ARGS.attention}", f"ctx={ARGS.ctx_names}",
            f"parallel.nproc={ARGS.nproc}", "task.new_tokens=8", "task.repeats=1", f"task.warmup={ARGS.warmup}",
            "wandb.mode=disabled", f"task.results_file={results}"]  # fmt: skip
    subprocess.run(argv, cwd=ROOT, check=True)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    table = Table(
        f"Llama-3.1-8B shapes, {' vs '.join(ARGS.attention.split(','))} time to first token on {ARGS.nproc} GPU{'s' * (ARGS.nproc > 1)}",
        " ".join(["python"] + argv[1:-1]),
        ["attention", "GPUs", "context", "TTFT (s)", "prefill (tok/s)", "phase-1 MFU", "decode (tok/s)", "peak memory per GPU (GiB)", "ring / star"],
    )
    table.figure = f"ttft-{ARGS.nproc}gpu"
    peak = matmul_peak()
    table.notes.append(
        "Random weights, bf16. TTFT covers phase 1 and phase 2 (the last 64 prompt tokens) up to the first token"
        + (", after a warm-up run." if ARGS.warmup else "; no warm-up run: compilation is included.")
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
        table.rows.append([r["attention"], r["ranks"], r["ctx"], r["ttft_s"], r["prefill_tok_s"], f"{mfu:.0%}", r["decode_tok_s"],
                           ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"]), ratio])  # fmt: skip
        emit(r, part="ttft")
    return [table]


# --- tensor parallelism inside a host


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
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA" and "Memcpy" not in e.key and "Memset" not in e.key)


def bench_tp(quick: bool) -> list[Table]:
    """Tensor parallel on one host at every degree up to `--nproc` (tp=1 on one GPU included), against star and ring
    over the same GPUs as hosts, and on 4 or more GPUs 2 hosts × tp; decode against the bandwidth bound per rank.
    For a model that fits one GPU, first the decode-graph kernels of tp=1 against the untouched model."""
    from omegaconf import OmegaConf

    from longctx import attention
    from longctx.models.loading import random_model
    from longctx.parallel.layout import Layout
    from longctx.parallel.tensor import valid_degrees
    from longctx.preflight.memory import preset_args, weight_bytes

    name = ARGS.models.split(",")[0]
    args = preset_args(OmegaConf.load(ROOT / f"conf/model/{name}.yaml"))
    counts = {}
    if weight_bytes(args, torch.bfloat16) < 0.6 * torch.cuda.get_device_properties(0).total_memory:
        for label, tp in (("model as built", None), ("through the tensor-parallel path, tp=1", Layout(1, 1).tensor_parallel(args))):
            model = random_model(args, torch.bfloat16, "cuda", attention.build("global"), tp=tp)
            counts[label] = graph_kernels(model, 1024)
            del model
            torch.cuda.empty_cache()
    bw = copy_bandwidth()
    results = Path(tempfile.mkdtemp()) / "tp.jsonl"
    n = ARGS.nproc
    ctx = "4k,32k" if quick else ARGS.ctx_names
    degrees = [d for d in valid_degrees(args) if d <= n]
    runs = [["attention=global", f"parallel.nproc={d}", f"parallel.tp={d}"] for d in degrees]
    runs += [[f"attention={a}", f"parallel.nproc={n}"] for a in ("star", "ring")] if n > 1 else []
    if n >= 4 and n // 2 in degrees:
        runs += [[f"attention={a}", f"parallel.nproc={n}", f"parallel.tp={n // 2}"] for a in ("star", "ring")]
    commands = _bench_runs([[*r, f"ctx={c}"] for r in runs for c in ctx.split(",")], results, name, "tp")
    table = Table(
        f"{name} shapes on {n} GPU{'s' * (n > 1)}: tensor parallel inside one host against star and ring across GPUs",
        "\n".join(commands),
        ["attention", "GPUs", "hosts × tp", "context", "TTFT (s)", "decode (tok/s)", "bound (tok/s)", "% of bound",
         "peak GPU memory per rank (GiB)", "peak host memory per rank (GiB)"],
    )  # fmt: skip
    table.figure = f"tp-{name}-{n}gpu"
    embedding = args.vocab_size * args.dim * 2  # one row of it is read per token
    for r in map(json.loads, results.read_text().splitlines()) if results.is_file() else []:
        kv = 2 * args.n_layers * max(1, args.n_kv_heads // r["tp"]) * args.head_dim * 2 * r["ctx"] // r["hosts"]
        bound = bw / (weight_bytes(args, torch.bfloat16, r["tp"]) - embedding + kv)
        table.rows.append([r["attention"], r["ranks"], f"{r['hosts']} × {r['tp']}", r["ctx"], r["ttft_s"], r["decode_tok_s"], bound,
                           100 * r["decode_tok_s"] / bound, ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"]),
                           ", ".join(f"{p / 2**30:.1f}" for p in r["peak_host_bytes_per_rank"])])  # fmt: skip
    table.notes.append(
        f"Random weights, bf16, one warm-up run, 16 new tokens. Decode runs as CUDA graphs in every row (the "
        f"tensor-parallel all-reduces captured with the rest). Bound: copy bandwidth {bw / 1e12:.2f} TB/s over the bytes "
        "one rank reads per token (its weights, the input embedding excluded, and its share of the KV cache); for star "
        "and ring the rank holding the most KV."
        + (" Kernels per replayed decode step (1,024-token prompt, one GPU): " + "; ".join(f"{k}: {v}" for k, v in counts.items()) + "."
           if counts else "")  # fmt: skip
    )
    return [table]


# --- hosts of GPUs: star against ring as they grow, 70B with tensor parallelism


CTX_TOKENS = {"4k": 4 * K, "8k": 8 * K, "16k": 16 * K, "32k": 32 * K, "64k": 64 * K, "128k": 128 * K, "256k": 256 * K,
              "512k": 512 * K, "1m": 1024 * K}  # fmt: skip


def _bench_runs(runs: list[list[str]], results: Path, model: str, part: str) -> list[str]:
    """Each run through `runner.py task=bench`, its record emitted (`--jsonl`) as soon as it ends, so that a
    measurement cut short keeps what it measured. A run whose memory plan does not fit the GPU is not started; the
    commands, with why a run is missing, are returned for the table."""
    from hydra import compose, initialize_config_dir

    from longctx.preflight import memory

    commands = []
    for run in runs:
        overrides = ["task=bench", f"model={model}", *run, "task.new_tokens=16", "task.repeats=1", "task.warmup=1",
                     "wandb.mode=disabled"]  # fmt: skip
        commands.append(" ".join(["python runner.py", *overrides]))
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            plan = memory.plan_config(compose("config", overrides=overrides))
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else math.inf
        if plan.need > total:
            commands[-1] += f"   # not run: needs {plan.need / 2**30:.0f} GiB per GPU of {total / 2**30:.0f}"
            continue
        seen = len(results.read_text().splitlines()) if results.is_file() else 0
        done = subprocess.run([sys.executable, "runner.py", *overrides, f"task.results_file={results}"], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        print(done.stderr[-2000:], flush=True)
        if done.returncode:
            commands[-1] += f"   # failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"
        for line in results.read_text().splitlines()[seen:] if results.is_file() else []:
            emit(json.loads(line), part=part)
    return commands


def bench_hosts(quick: bool) -> list[Table]:
    """Star against ring as hosts grow (issue 14), one GPU per host: star with one block per GPU and with a quarter of
    the context per block, both anchor modes, and ring, at each `--ctx-names` length on `--nproc` GPUs."""
    n, results = ARGS.nproc, Path(tempfile.mkdtemp()) / "hosts.jsonl"
    runs = []
    for name in ARGS.ctx_names.split(","):
        L = CTX_TOKENS[name]
        for block, mode in itertools.product(dict.fromkeys((-(-L // n), -(-L // 4))), ("broadcast", "recompute")):
            runs.append([f"ctx={name}", "attention=star", f"attention.params.block_size={block}",
                         f"attention.params.anchor_mode={mode}", f"parallel.nproc={n}"])  # fmt: skip
        runs.append([f"ctx={name}", "attention=ring", f"parallel.nproc={n}"])
    name = ARGS.models.split(",")[0]
    commands = _bench_runs(runs, results, name, "hosts")
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    table = Table(
        f"{name} shapes on {n} GPUs: star against ring as the hosts grow",
        "\n".join(commands),
        ["attention", "block", "blocks", "anchor", "context", "TTFT (s)", "ring / star", "≈ P/3 (attention only)", "decode (tok/s)",
         "peak GPU memory per rank (GiB)"],
    )  # fmt: skip
    table.figure = f"hosts-{name}-{n}gpu"
    ring = {r["ctx"]: r["ttft_s"] for r in records if r["attention"] == "ring"}
    for r in records:
        star = r["attention"] == "star"
        blocks = -(-r["ctx"] // r["block_size"]) if star else float("nan")
        table.rows.append([r["attention"], r.get("block_size", "–") if star else "–", blocks, r.get("anchor_mode", "–") if star else "–",
                           r["ctx"], r["ttft_s"], ring.get(r["ctx"], float("nan")) / r["ttft_s"] if star else float("nan"),
                           blocks / 3 if star else float("nan"), r["decode_tok_s"],
                           ", ".join(f"{p / 2**30:.1f}" for p in r["peak_mem_bytes_per_rank"])])  # fmt: skip
    table.notes.append(
        "Random weights, bf16, one warm-up run; TTFT covers phase 1 and phase 2 up to the first token. With P equal "
        "blocks, star's phase-1 attention is about P/3 of a balanced ring's (each block sees itself and the anchor, "
        "where the ring's tokens see on average half of the context); the linear layers are the same work in both."
    )
    return [table]


# --- the memory plan against the measured peak


def bench_memory(quick: bool) -> list[Table]:
    """runner.py task=bench for each model, strategy and context: the plan's peak per rank next to the measured one
    (the CUDA allocator's peak on a GPU; on CPU, the process's max resident memory against the plan with its
    runtime term). On a GPU, then the headline command, which must be refused in seconds."""
    results = Path(tempfile.mkdtemp()) / "memory.jsonl"
    cuda = torch.cuda.is_available()
    lengths = [64 * K] if quick else [64 * K, 128 * K, ARGS.longest]
    lengths = ARGS.lengths.split(",") if ARGS.lengths else list(map(str, lengths))
    commands = []
    for model, attention in itertools.product(ARGS.models.split(","), ARGS.attention.split(",")):
        argv = [sys.executable, "runner.py", "-m", "task=bench", f"model={model}", f"attention={attention}",
                f"ctx.length={','.join(lengths)}", f"parallel.nproc={ARGS.nproc}", "task.new_tokens=8",
                "task.warmup=0", "task.repeats=1", "wandb.mode=disabled", f"task.results_file={results}"]  # fmt: skip
        commands.append(" ".join(["python"] + argv[1:-1]))
        subprocess.run(argv, cwd=ROOT, check=True)
    where = f"{ARGS.nproc} GPU{'s' * (ARGS.nproc > 1)}" if cuda else "CPU"
    table = Table(
        f"the memory plan against the measured peak on {where}",
        "\n".join(commands),
        ["model", "attention", "ranks", "rank", "context", "planned peak (GiB)", "measured peak (GiB)", "planned / measured", "TTFT (s)"],
    )
    table.figure = f"memory-{ARGS.nproc}gpu" if cuda else "memory-cpu"
    for r in map(json.loads, results.read_text().splitlines()):
        for rank, (planned, peak) in enumerate(zip(r["planned_peak_bytes_per_rank"], r["peak_mem_bytes_per_rank"])):
            row = [r["model"], r["attention"], r["ranks"], rank, r["ctx"], planned / 2**30, peak / 2**30, planned / peak, r["ttft_s"]]
            table.rows.append(row)
        emit(r, part="memory")
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
    refused = subprocess.run([sys.executable, "runner.py", "model=llama3", "attention=star", "ctx=1m", "task=bench",
                              "wandb.mode=disabled"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    table.notes.append(
        f"The headline command `python runner.py model=llama3 attention=star ctx=1m task=bench` on this GPU: exit code "
        f"{refused.returncode} after {seconds:.1f} s with\n\n> {refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else '(no message)'}"
    )
    return [table]


# --- output

HISTORY = "<!-- history -->\n\n# History: tables a newer run of the same figure replaced, newest first\n"


def publish(doc: str, section: str, figure: str) -> str:
    """`doc` (BENCHMARKS.md's text) with `section` as the current table of `figure`: it takes the place of the one
    it replaces, which moves to the top of the history at the end of the file; a new figure goes after the others."""
    marker = f"<!-- figure: {figure} -->"
    if HISTORY not in doc:
        doc = doc.rstrip("\n") + "\n\n" + HISTORY
    current, past = doc.split(HISTORY, 1)
    new = f"{marker}\n\n{section.strip()}\n\n"
    if marker in current:
        head, rest = current.split(marker, 1)
        nxt = rest.find("<!-- figure: ")
        old, tail = (rest[:nxt], rest[nxt:]) if nxt >= 0 else (rest, "")
        current = head + new + tail
        past = "\n" + old.strip() + "\n" + past
    else:
        current = current.rstrip("\n") + "\n\n" + new
    return current.rstrip("\n") + "\n\n" + HISTORY + past


def emit(row: dict, **extra) -> None:
    if ARGS.jsonl:
        with open(ARGS.jsonl, "a") as f:
            f.write(json.dumps({**row, **extra, "device": _device_name(), "torch": torch.__version__}) + "\n")


PARTS = {"decode": bench_decode, "prefill": bench_prefill, "model": bench_model, "gemv": bench_gemv, "ttft": bench_ttft, "memory": bench_memory,
         "tp": bench_tp, "hosts": bench_hosts, "hsr": bench_hsr,
         "hsr-model": bench_hsr_model, "shapes": bench_shapes}
ARGS: argparse.Namespace


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=sorted(PARTS))
    parser.add_argument("--tune", action="store_true", help="decode: sweep Lean launch settings first; prefill: try flex kernel_options")
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--profile", action="store_true", help="model, hsr: GPU time per kernel of a decode step")
    parser.add_argument("--ctx", default="4096,65536", help="model: prompt tokens, comma-separated")
    parser.add_argument("--ctx-names", default="64k,128k", help="ttft: ctx presets")
    parser.add_argument("--contexts", default="131072,262144", help="hsr-model: comma-separated prompt lengths")
    parser.add_argument("--attention", default="ring,star", help="ttft, memory: strategies")
    parser.add_argument("--nproc", type=int, default=max(1, torch.cuda.device_count()), help="ttft, memory: ranks")
    parser.add_argument("--warmup", type=int, default=1, help="ttft: warm-up runs")
    parser.add_argument("--longest", type=int, default=256 * K, help="memory: the longest context measured")
    parser.add_argument("--lengths", help="memory: comma-separated contexts in tokens instead of 64K, 128K, --longest")
    parser.add_argument("--models", default="llama3", help="memory: comma-separated model presets")
    parser.add_argument("--append", default="BENCHMARKS.md", help="markdown file whose figures the tables become the current ones of (the replaced ones go to its history); - for none")
    parser.add_argument("--jsonl", type=Path)
    ARGS = parser.parse_args(argv)
    if not torch.cuda.is_available() and ARGS.parts != ["memory"]:
        parser.error("the benchmarks need a CUDA GPU (all but `memory`, which also runs on CPU)")
    for switch, off in MULTICAST_OFF.items():
        os.environ.setdefault(switch, off)
    for part in ARGS.parts:
        for table in PARTS[part](ARGS.quick):
            text = table.markdown()
            print(text, flush=True)
            if ARGS.append != "-":
                target = ROOT / ARGS.append if not Path(ARGS.append).is_absolute() else Path(ARGS.append)
                doc = publish(target.read_text() if target.is_file() else "# Benchmarks\n", text, table.figure or part)
                tmp = target.with_suffix(".tmp")
                tmp.write_text(doc)
                tmp.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
