"""The KV cache in FP8 and phase 1 in chunks: `runner.py task=bench` for Llama-3.1-8B shapes (decode, time to first
token, the plan against the measured peak), the longest context the plan fits on this GPU, the Lean decode kernel
alone; and on CPU the round-trip error of FP8 scales by granularity on a real model's keys and values."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from longctx.attention.strategy import AUTO_CHUNK
from longctx.tools.bench.common import ROOT, K, Recorder, Table, graph_timed, per_gpu

GiB = 2**30
# Star blocks of the longest run: at default blocks (a quarter of the context) a token of a 1M context attends to
# about 375K keys in phase 1, six times as many, which is minutes of phase 1 on one GPU for no extra memory
LONGEST_BLOCK = 64 * K
CALIBRATION = 256  # tokens a fixed per-tensor scale is taken from (`bench_fp8_scales`)
NEW_SLOTS = 40  # empty slots past the context in `bench_fp8_lean`'s layer-like read, as a decode step's cache has


def _argv(results: Path, *options: str) -> list[str]:
    return [sys.executable, "runner.py", "-m", "task=bench", "model=llama3", "task.new_tokens=40", "task.repeats=1",
            "wandb.mode=disabled", *options, f"task.results_file={results}"]  # fmt: skip


def _shown(results: Path, *options: str) -> str:
    """The command as a table shows it."""
    return " ".join(["python"] + _argv(results, *options)[1:-1])


def _bench(results: Path, *options: str) -> str:
    """runner.py -m task=bench with `options`, each run's record appended to `results`; returns the command as a table
    shows it."""
    subprocess.run(_argv(results, *options), cwd=ROOT, check=True)
    return _shown(results, *options)


def _key(record: dict) -> tuple:
    return tuple(record.get(f) for f in ("attention", "ctx", "kv_dtype", "chunk", "block_size"))


def _records(results: Path) -> list[dict]:
    """The runs `results` holds, the latest of each (strategy, context, KV dtype, chunk, block)."""
    lines = results.read_text().splitlines() if results.is_file() else []
    return list({_key(r): r for r in map(json.loads, lines)}.values())


def _holds(records: list[dict], wanted: dict) -> bool:
    """Whether one of `records` is the run `wanted` describes (the fields it names)."""
    return any(all(r.get(f) == v for f, v in wanted.items()) for r in records)


def bench_kv(
    rec: Recorder,
    contexts: list[int],
    strategies: list[str],
    longest: int | None = None,
    warmup: int = 1,
    quick: bool = False,
    longest_block: int = LONGEST_BLOCK,
    results: Path | None = None,
) -> list[Table]:
    """The strategies, bf16 against FP8 and int8 KV, at each context; chunked phase 1 against one pass at the longest
    context (and chunks of 8K and 4K at the shortest, where there are two); star with FP8 KV at `longest` (blocks of
    `longest_block` tokens), in a table of its own. One process per context and per chunked sweep; every timed run
    follows `warmup` untimed ones (0: a 4K run first, so that compiles are not timed; the longest run has none: its
    compiles are seconds of minutes). No contexts: the run at `longest` alone. Each GPU model keeps its own tables.

    `results`: the file the runs' records go to (default: a new temporary one). A process whose runs it already holds
    is not started again, so a sweep cut short (a time limit) goes on where it stopped when given the same file."""
    if not contexts and not longest:
        raise ValueError("kv: give contexts (--lengths) or a longest run (--longest-kv)")
    results = results or Path(tempfile.mkdtemp()) / "kv.jsonl"
    each = (f"attention={','.join(strategies)}", f"task.warmup={warmup}")
    kinds = ("auto", "fp8", "int8")
    wanted_all: list[dict] = []

    def sweep(wanted: list[dict], *options: str, vary: tuple[str, str, tuple] | None = None) -> str:
        """Run what `results` lacks of `wanted`; `vary` = (option, record field, values): the option swept, of
        whose values only those with runs missing are run again (the command shown names them all)."""
        wanted_all.extend(wanted)
        done = _records(results)
        missing = [w for w in wanted if not _holds(done, w)]
        key, field, values = vary or ("", "", ())

        def swept(xs) -> tuple[str, ...]:
            return (f"{key}={','.join(map(str, xs))}",) if vary else ()

        if missing:
            _bench(results, *options, *swept(x for x in values if any(w[field] == x for w in missing)))
        return _shown(results, *options, *swept(values))

    def runs_of(n: int, kv_dtypes=kinds, chunks=(None,)) -> list[dict]:
        return [dict(attention=a, ctx=n, kv_dtype=d, chunk=c) for a in strategies for d in kv_dtypes for c in chunks]

    commands = []
    for n in contexts:
        lengths = f"{4 * K},{n}" if warmup == 0 else str(n)
        commands.append(sweep(runs_of(n), *each, f"ctx.length={lengths}", vary=("kv.dtype", "kv_dtype", kinds)))
    if contexts:
        n = contexts[-1]
        commands.append(sweep(runs_of(n, ("auto",), (n,)), *each, f"ctx.length={n}", f"ctx.chunk={n}"))
    if len(contexts) > 1:  # one pass first, in the process of its chunks: TTFTs measured side by side
        n = contexts[0]
        chunks = tuple(c for c in dict.fromkeys((n, 8192, 4096)) if c <= n)
        commands.append(
            sweep(runs_of(n, ("auto",), chunks), *each, f"ctx.length={n}", vary=("ctx.chunk", "chunk", chunks))
        )
    long_options = ("attention=star", "kv.dtype=fp8", f"ctx.length={longest}",
                    f"attention.params.block_size={longest_block}", "task.warmup=0")  # fmt: skip
    long_run = dict(attention="star", ctx=longest, kv_dtype="fp8", block_size=longest_block)
    long_command = sweep([long_run], *long_options) if longest else None
    records = [r for r in _records(results) if any(_holds([r], w) for w in wanted_all)]  # (not the 4K warm-ups)
    # by strategy, context, KV dtype and passes (one pass first), whatever order the runs were measured in
    records.sort(key=lambda r: (r["attention"], r["ctx"], kinds.index(r["kv_dtype"]), -(r.get("chunk") or AUTO_CHUNK)))
    for r in records:
        rec.emit(r, part="kv")
    longest_runs = [r for r in records if longest and r["ctx"] == longest and r.get("block_size") == longest_block]
    records = [r for r in records if r not in longest_runs]
    runs = Table(
        "Llama-3.1-8B shapes on 1 GPU: the KV cache in bf16 against FP8 and int8, global and star",
        "\n".join(commands),
        [
            "attention",
            "context",
            "KV",
            "chunk",
            "TTFT (s)",
            "decode (tok/s)",
            "vs bf16 decode",
            "vs bf16 TTFT",
            "planned peak (GiB)",
            "measured peak (GiB)",
            "planned / measured",
        ],  # fmt: skip
    )
    runs.figure = per_gpu("fp8-runs")
    default = [r for r in records if r.get("chunk") is None]
    base = {(r["attention"], r["ctx"]): r for r in default if r["kv_dtype"] == "auto"}
    for r in default:
        b = base.get((r["attention"], r["ctx"]))
        one_byte = r["kv_dtype"] != "auto"
        planned, peak = r["planned_peak_bytes_per_rank"][0], r["peak_mem_bytes_per_rank"][0]
        runs.rows.append([
            r["attention"], r["ctx"], r["kv_dtype"] if one_byte else "bf16", "default", r["ttft_s"], r["decode_tok_s"],
            r["decode_tok_s"] / b["decode_tok_s"] if one_byte and b else float("nan"),
            r["ttft_s"] / b["ttft_s"] if one_byte and b else float("nan"), planned / GiB, peak / GiB, planned / peak,
        ])  # fmt: skip
    runs.notes.append(
        "Random weights, bf16 activations, batch 1, after a warm-up run; TTFT covers phase 1 and phase 2 (the last 64 "
        "prompt tokens) up to the first token, decode the 37 tokens after it and two set-up steps. Chunk `default`: "
        "64K tokens per pass. Peaks: the CUDA allocator's, against the plan `task=plan` prints."
    )
    chunked = Table(
        "Llama-3.1-8B shapes on 1 GPU: phase 1 in chunks against one pass (bf16 KV)",
        "\n".join(commands),
        ["attention", "context", "chunk", "TTFT (s)", "chunked / one pass", "measured peak (GiB)"],
    )
    chunked.figure = per_gpu("chunked")
    chunked.notes.append(
        "Chunked / one pass: against the one pass run in the same process as the chunks (`ctx.chunk` = the context), "
        "where there is one, else the default's."
    )
    bf16 = [r for r in records if r["kv_dtype"] == "auto"]
    for r in bf16:
        ones = [o for o in bf16 if (o["attention"], o["ctx"]) == (r["attention"], r["ctx"]) and o["phase1_passes"] == 1]
        one = min(ones, key=lambda o: o.get("chunk") is None, default=None)  # that of the chunks' own process first
        chunk, passes = r.get("chunk") or AUTO_CHUNK, r["phase1_passes"]
        chunked.rows.append([
            r["attention"], r["ctx"], f"{chunk} ({passes} pass{'es' * (passes != 1)})", r["ttft_s"],
            r["ttft_s"] / one["ttft_s"] if one else float("nan"), r["peak_mem_bytes_per_rank"][0] / GiB,
        ])  # fmt: skip
    return [table for table in (runs, chunked, _longest_table(longest_runs, long_command)) if table.rows]


def _longest_table(records: list[dict], command: str | None) -> Table:
    """The long star FP8 runs: TTFT, decode and the plan against the measured peak."""
    table = Table(
        "Llama-3.1-8B shapes on 1 GPU: the longest context, star with FP8 KV",
        command or "",
        ["attention", "context", "KV", "star block", "phase-1 chunk", "TTFT (s)", "decode (tok/s)", "KV cache (GiB)",
         "planned peak (GiB)", "measured peak (GiB)", "planned / measured"],
    )  # fmt: skip
    table.figure = per_gpu("longest-run")
    for r in records:
        planned, peak = r["planned_peak_bytes_per_rank"][0], r["peak_mem_bytes_per_rank"][0]
        table.rows.append([
            r["attention"], r["ctx"], r["kv_dtype"], r["block_size"], r["chunk"], r["ttft_s"], r["decode_tok_s"],
            r["kv_bytes_per_rank"][0] / GiB, planned / GiB, peak / GiB, planned / peak,
        ])  # fmt: skip
    table.notes.append(
        "Random weights, bf16 activations, batch 1, no warm-up run (TTFT includes compiles); phase 1 passes of the "
        "chunk the memory plan chose to fit, anchor of one block. Decode: 37 tokens after the first, at this context."
    )
    return table


def bench_kv_fits(rec: Recorder, quick: bool = False) -> list[Table]:
    """The longest context the memory plan fits in this GPU's free memory: global and star, bf16 against FP8 KV, the
    default chunks."""
    from omegaconf import OmegaConf

    from longctx.preflight import memory

    free, _ = torch.cuda.mem_get_info()
    base = OmegaConf.load(ROOT / "conf" / "config.yaml")
    cfg = OmegaConf.create({k: v for k, v in base.items() if k not in ("defaults", "hydra")})
    for group, name in {"model": "llama3", "ctx": "1m", "parallel": "single", "task": "bench"}.items():
        cfg[group] = OmegaConf.merge(cfg.get(group) or {}, OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml"))
    cfg.device = "cuda"
    table = Table(
        "Llama-3.1-8B shapes: the longest context the memory plan fits on one GPU",
        "python tools/benchmarks.py kv-fits",
        [
            "attention",
            "KV",
            "longest context (tokens)",
            "phase-1 chunk",
            "KV cache (GiB)",
            "planned need (GiB)",
            "free (GiB)",
        ],  # fmt: skip
    )
    table.figure = per_gpu("kv-fits")
    cfg.memory.limit_gib = free / GiB
    for attention in ("global", "star"):
        cfg.attention = OmegaConf.load(ROOT / "conf" / "attention" / f"{attention}.yaml")
        for kv in ("auto", "fp8"):
            cfg.kv = {"dtype": kv}
            lo, hi, plan = 0, 4 << 20, None
            while hi - lo > 1024:
                mid = (lo + hi) // 2 // 1024 * 1024
                cfg.ctx.length, cfg.ctx.chunk = mid, None
                try:
                    with contextlib.redirect_stderr(io.StringIO()):  # (the chunk each fitting plan chose)
                        fitted = memory.check_fits(cfg, torch.device("cuda"))
                    lo, plan = mid, (fitted, cfg.ctx.chunk)
                except memory.DoesNotFit:
                    hi = mid
            fitted, chunk = plan
            row = [attention, "fp8" if kv == "fp8" else "bf16", fitted.shape.n_ctx + 64, chunk or "64K (default)",
                   fitted.ranks[0].terms["KV cache"] / GiB, fitted.need / GiB, free / GiB]  # fmt: skip
            rec.emit(dict(zip(table.columns, row)), part="kv-fits")
            table.rows.append(row)
    table.notes.append(
        "Need: the fullest rank's tensors, 5% slack and the CUDA runtime, as `memory.check` compares it with free "
        "memory before loading, where an unset `ctx.chunk` shrinks to the largest chunk that fits. Figure `longest-run` "
        "(per GPU) runs star FP8 at the longest of them."
    )
    return [table]


WRITE_SHAPES = ((16, 4), (16, 8), (8, 4), (4, 2), (4, 1), (2, 1), (1, 1), (1, 2))  # (rows per program, warps)


def _shape(rows: int, warps: int) -> str:
    return f"{rows} row{'s' * (rows > 1)}, {warps} warp{'s' * (warps > 1)}"


def bench_fp8_write(rec: Recorder, quick: bool = False) -> list[Table]:
    """The one-byte cache's write kernel (attention/quant_triton.py) for 8 KV heads of head dim 128, by program shape:
    a decode step's token, and passes of more; the shape `program_shape` takes for each is marked."""
    from longctx.attention import quant_triton
    from longctx.attention.cache import KVCache

    tokens = (1, 8, 512, 32 * K) if not quick else (1, 512)
    table = Table(
        "the FP8 cache's write kernel (rotate, encode, store), 8 KV heads of head dim 128, by program shape",
        "python tools/benchmarks.py fp8-write",
        ["tokens", *(f"{_shape(r, w)} (µs)" for r, w in WRITE_SHAPES), "taken", "taken / fastest"],
    )
    table.figure = "fp8-write"
    for n in tokens:
        cache = KVCache(1, 1, 8, 64 * K, 128, torch.float8_e4m3fn, "cuda", compute_dtype=torch.bfloat16)
        layer = cache.layers[0]
        # (strided as a model's are: [B, T, H, D] seen as [B, H, T, D])
        k, v = (torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        slots = torch.arange(n, device="cuda") + 1
        times = []
        for shape in WRITE_SHAPES:
            with quant_triton.SHAPES.scoped((shape, shape)):
                times.append(graph_timed(lambda: layer.write(slots, k, v)))
        taken = quant_triton.program_shape(8 * n)
        t = graph_timed(lambda: layer.write(slots, k, v))
        table.rows.append([n, *(x * 1e6 for x in times), _shape(*taken), t / min(times)])
        rec.emit(dict(tokens=n, us={f"{r}x{w}": x * 1e6 for (r, w), x in zip(WRITE_SHAPES, times)}), part="fp8-write")
        del cache, k, v
    table.notes.append(
        "CUDA-graph replay times of `LayerKV.write` over an FP8 cache (keys as rows, values in tiles, scales' "
        "exponents), under each program shape; taken: the shape `quant_triton.program_shape` gives that many rows "
        "(tokens x 8 KV heads)."
    )
    return [table]


def bench_lean_fp8(rec: Recorder, contexts: list[int], quick: bool = False, tune: bool = False) -> list[Table]:
    """Decode attention alone on the Lean kernel (one query, GQA 4, head dim 128, 8 KV heads): bf16 against FP8 and
    int8; `tune`: first FP8 under other launch settings (their table is printed, not published)."""
    from dataclasses import replace

    from longctx.attention import kernels, lean
    from longctx.attention.mask import PositionMask
    from longctx.attention.quant import FP8, INT8, quantize, tile_values

    table = Table(
        "decode attention over a long KV cache on the Lean kernel: bf16 against FP8 and int8 (in-kernel scales)",
        "python tools/benchmarks.py fp8-lean",
        [
            "keys",
            "bf16 (µs)",
            "FP8 (µs)",
            "int8 (µs)",
            "FP8, as a layer reads it (µs)",
            "FP8 speedup",
            "int8 speedup",
            "bf16 GB/s",
            "FP8 GB/s",
            "int8 GB/s",
        ],  # fmt: skip
    )
    table.figure = "fp8-lean"
    g = torch.Generator(device="cuda").manual_seed(0)
    if tune:
        S = contexts[-1]
        q = torch.randn(1, 32, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        (k8, ks), (v8, vs) = (quantize(torch.randn(1, 8, S, 128, device="cuda", generator=g)) for _ in range(2))
        v8 = tile_values(v8)  # (as a cache keeps them)
        mask = PositionMask(torch.tensor([S - 1], device="cuda"), torch.arange(S, device="cuda"))
        base = lean.FP8_CONFIG.get()
        for block_n, warps, stages, per_sm in itertools.product((64, 128, 256, 512), (4, 8, 16), (2, 3, 4), (1, 2, 3)):
            config = replace(base, block_n=block_n, warps=warps, stages=stages, programs_per_sm=per_sm)
            try:
                with lean.FP8_CONFIG.scoped(config):
                    t = graph_timed(lambda: lean.lean_attend(q, k8, v8, mask, scales=(ks, vs)))
            except Exception as e:  # a setting that does not compile or fit
                print(f"tune {config}: {type(e).__name__}", flush=True)
                continue
            print(f"tune {block_n=} {warps=} {stages=} {per_sm=}: {t * 1e6:.1f} µs, "
                  f"{2 * 8 * S * 129 / t / 1e9:.0f} GB/s", flush=True)  # fmt: skip
        del k8, v8
    for S in contexts:
        q = torch.randn(1, 32, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, S, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        mask = PositionMask(torch.tensor([S - 1], device="cuda"), torch.arange(S, device="cuda"))
        t16 = graph_timed(lambda: lean.lean_attend(q, k, v, mask))
        times = []
        for stored in (FP8, INT8):
            (k8, ks), (v8, vs) = quantize(k, stored), quantize(v, stored)
            v8 = tile_values(v8)  # (as a cache keeps them)
            times.append(graph_timed(lambda: lean.lean_attend(q, k8, v8, mask, scales=(ks, vs))))
            del k8, v8, ks, vs
        # FP8 as a layer reads it: the query rotated to the stored frame and the output back, over a cache whose
        # capacity runs past its tokens (a decode step's new ones: not a multiple of 16 slots)
        free = torch.full((NEW_SLOTS,), -1, device="cuda")
        held = PositionMask(mask.q_pos, torch.cat([mask.kv_pos, free]))
        (k8, ks), (v8, vs) = (quantize(torch.nn.functional.pad(x, (0, 0, 0, NEW_SLOTS))) for x in (k, v))
        v8 = tile_values(v8)
        whole = graph_timed(lambda: kernels.attend(q, k8, v8, held, scales=(ks, vs)))
        del k8, v8, ks, vs
        del k, v
        (t8, ti8), b16, b8 = times, 2 * 8 * S * 128 * 2, 2 * 8 * S * (128 + 1)
        row = [S, t16 * 1e6, t8 * 1e6, ti8 * 1e6, whole * 1e6, t16 / t8, t16 / ti8, b16 / t16 / 1e9, b8 / t8 / 1e9,
               b8 / ti8 / 1e9]  # fmt: skip
        rec.emit(dict(zip(table.columns, row)), part="fp8-lean")
        table.rows.append(row)
    table.notes.append(
        "CUDA-graph replay times of the kernel alone (speedups and GB/s are of it) and, for FP8, of the read as a layer "
        "makes it (`attention.kernels.attend`: the kernel rotating the queries to the stored frame and its output "
        f"back, attention/quant.py, over {NEW_SLOTS} empty slots past the keys, as a decode step's cache has them); "
        "values in tiles of keys, as a cache keeps them (`attention.quant.tile_values`); bytes: keys and values read "
        "(one byte: with their scales' exponents). Launch settings (attention/lean.py): bf16 "
        f"{lean.CONFIG.get()}, FP8 {lean.FP8_CONFIG.get()}, int8 {lean.ONE_BYTE_CONFIG.get()}."
    )
    return [table]


def bench_fp8_scales(rec: Recorder, quick: bool = False) -> list[Table]:
    """The error of SmolLM2's keys and values (real weights, a 2,048-token prose prompt) stored in one byte, by
    format, scale granularity and rotation (attention/quant.py): of the keys and values themselves and of attention's
    output over them, for the prompt's last queries in every layer."""
    import math

    from longctx import models
    from longctx.attention.quant import FP8, FP8_MAX, INT8, dequantize, encode, round_trip
    from longctx.models.builtin import BUILTINS

    path = BUILTINS["smollm2"]()
    model = models.load_model(path, dtype=torch.float32)
    licences = sorted(Path("/usr/share/common-licenses").iterdir())  # prose every Debian-family machine holds
    text = " ".join(f.read_text() for f in licences if f.is_file())
    ids = models.Tokenizer.from_dir(path).encode(text)[: 2 * K]
    S = len(ids) // 64 * 64
    queries = 32 if quick else 128
    kept = []  # each layer's (last queries, keys, values), as its attention gets them
    attend = model.attention.attend

    def keep(q, k, v, *rest):
        kept.append((q[0, :, S - queries : S].double(), k[0, :, :S], v[0, :, :S]))
        return attend(q, k, v, *rest)

    model.attention.attend = keep
    with torch.inference_mode():
        model(torch.tensor([ids[:S]]), torch.arange(S))

    def plain(fmt: torch.dtype):
        return lambda x: dequantize(*encode(x, fmt), torch.float32)

    def blockwise(x: torch.Tensor, n: int = 64) -> torch.Tensor:
        H, S, D = x.shape
        return plain(FP8)(x.reshape(H, S // n, n * D)).reshape(H, S, D)

    def per_tensor(x: torch.Tensor) -> torch.Tensor:
        return plain(FP8)(x.reshape(1, -1)).reshape(x.shape)

    def static(x: torch.Tensor) -> torch.Tensor:
        """One scale from the first CALIBRATION tokens, as a cache must fix it before later tokens arrive."""
        amax = x[:, :CALIBRATION].abs().amax()
        scale = 2.0 ** torch.ceil(torch.log2(amax / FP8_MAX))
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last queries (float64), query heads grouped over the KV heads."""
        g = q.shape[0] // k.shape[0]
        k, v = (x.double().repeat_interleave(g, 0) for x in (k, v))
        scores = q @ k.mT / math.sqrt(q.shape[-1])
        seen = torch.arange(S) <= torch.arange(S - queries, S)[:, None]
        return scores.masked_fill(~seen, -math.inf).softmax(-1) @ v

    table = Table(
        "One-byte keys and values of SmolLM2-135M (real weights): error by format, scale granularity and rotation",
        "python tools/benchmarks.py fp8-scales",
        ["format", "scale per", "rotated", "keys: median (%)", "keys: 99th pct (%)", "values: median (%)",
         "values: 99th pct (%)", "attention output: median (%)", "attention output: 99th pct (%)",
         "scale bytes per token and KV head"],
    )  # fmt: skip
    table.figure = "fp8-scales"

    def rel(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        return ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)).flatten()

    for fmt, name, rotated, fn, cost in (
        ("e4m3", "token and KV head", "no", plain(FP8), 1),
        ("e4m3", "64 tokens and KV head", "no", blockwise, 1 / 64),
        ("e4m3", "tensor, from all tokens", "no", per_tensor, 0),
        ("e4m3", f"tensor, fixed from the first {CALIBRATION} tokens", "no", static, 0),
        ("e4m3", "token and KV head", "yes (the cache's)", lambda x: round_trip(x, FP8), 1),
        ("int8", "token and KV head", "no", plain(INT8), 1),
        ("int8", "token and KV head", "yes (the cache's)", lambda x: round_trip(x, INT8), 1),
    ):
        errs, outs = [[], []], []
        for q, k, v in kept:
            kq, vq = fn(k), fn(v)
            errs[0].append(rel(kq, k))
            errs[1].append(rel(vq, v))
            outs.append(rel(attention(q, kq, vq), attention(q, k, v)))
        row = [fmt, name, rotated]
        for e in (*errs, outs):
            e = torch.cat(e).double()
            row += [100 * e.median().item(), 100 * e.quantile(0.99).item()]
        row.append(cost)
        rec.emit(dict(zip(table.columns, row)), part="fp8-scales")
        table.rows.append(row)
    table.notes.append(
        "Error: |x − stored(x)| / |x| per token and KV head, and the same for attention's output per query and head "
        f"(float64, causal, the last {queries} queries of every layer), over a {S:,}-token prompt of prose. e4m3 is a "
        "float format (3 mantissa bits over 17 binades), so any scale that leaves the largest value in range gives "
        "the same error of the values; a scale per token is the one fixed when the token is written (a block's would "
        "change as decode fills it, and a tensor's is known only once every token is), and a fixed scale clips what "
        f"grows past its calibration to {FP8_MAX:.0f}. Rotated: stored as x @ S, S a Walsh-Hadamard matrix with fixed "
        "signs, read back by its transpose; it leaves a vector's rounding error as large but spreads it over every "
        "channel, so that scores and outputs, which the few large channels dominate, see less of it."
    )
    return [table]
