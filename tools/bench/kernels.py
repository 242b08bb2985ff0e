"""Benchmarks of single kernels on a GPU: decode attention (Lean against SDPA), HSR's sparse decode, phase-1
attention by shape (the fused kernels against FlexAttention), and batch-1 projections by weight layout."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from longctx.attention import lean
from longctx.attention.kernels import _compiled_flex, flex_options
from longctx.attention.mask import PositionMask
from longctx.tools.bench.common import K, Recorder, Table, copy_bandwidth, graph_timed, llama3_args, timed

# --- decode attention


def _decode_inputs(B: int, hkv: int, group: int, S: int):
    q = torch.randn(B, hkv * group, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, hkv, S, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return q, k, v, PositionMask(torch.tensor([S - 1], device="cuda"), torch.arange(S, device="cuda"))


TUNE_SHAPES = [
    (1, 1, 8, 32 * K),
    (1, 8, 4, 32 * K),
    (8, 8, 4, 8 * K),
    (1, 8, 4, 128 * K),
    (1, 1, 8, 256 * K),
    (2, 4, 4, 1024 * K),
]


def tune_lean() -> tuple[lean.LeanConfig, Table]:
    """Every launch setting on a few shapes, and the one of the best geometric-mean time."""
    table = Table(
        "Lean decode kernel launch settings",
        "python tools/benchmarks.py decode --tune",
        [
            "block_n",
            "warps",
            "stages",
            "programs/SM",
            "min tiles",
            *[f"B{b} kv{h} g{g} {s // K}K (µs)" for b, h, g, s in TUNE_SHAPES],
            "geomean (µs)",
        ],
    )
    table.figure = "lean-tune"
    inputs = [_decode_inputs(*shape) for shape in TUNE_SHAPES]
    results = []
    for block_n, warps, stages, per_sm, min_tiles in itertools.product((64, 128), (4, 8), (3, 4), (1, 2), (1, 4, 8)):
        config = lean.LeanConfig(block_n, warps, stages, per_sm, min_tiles)
        try:
            with lean.CONFIG.scoped(config):
                times = [graph_timed(lambda: lean.lean_attend(q, k, v, m)) * 1e6 for q, k, v, m in inputs]
        except Exception as e:  # a setting that does not fit (shared memory) is reported, not fatal
            print(f"skip {config}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        results.append((math.exp(sum(map(math.log, times)) / len(times)), config, times))
        print(f"{config} {' '.join(f'{t:8.1f}' for t in times)}", flush=True)
    results.sort(key=lambda r: r[0])
    for mean, c, times in results[:8]:
        table.rows.append([c.block_n, c.warps, c.stages, c.programs_per_sm, c.min_tiles, *times, mean])
    best = results[0][1]
    table.notes.append(f"The best {len(table.rows)} of {len(results)} settings; the sweep below runs with {best}.")
    del inputs
    return best, table


def bench_decode(rec: Recorder, quick: bool = False, tune: bool = False) -> list[Table]:
    """Decode attention alone over a long KV cache: the Lean kernel against SDPA and a fixed split per head (first,
    with `tune`, every launch setting; the sweep then runs with the best)."""
    if not tune:
        return [_decode_sweep(rec, quick, tune)]
    best, table = tune_lean()
    with lean.CONFIG.scoped(best):
        return [table, _decode_sweep(rec, quick, tune)]


def _decode_sweep(rec: Recorder, quick: bool, tune: bool) -> Table:
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = Table(
        "decode attention over a long KV cache: Lean kernel vs SDPA vs fixed split",
        "python tools/benchmarks.py decode" + (" --tune" if tune else ""),
        [
            "batch",
            "KV heads",
            "group",
            "context",
            "KV MB",
            "Lean graph (µs)",
            "% of copy",
            "Lean eager (µs)",
            "SDPA graph (µs)",
            "Lean / SDPA",
            "fixed split graph (µs)",
            "stream-K gain",
            "max abs diff",
        ],
    )
    table.figure = "decode"
    table.notes.append(
        f"bf16, head dim 128, one query token; copy bandwidth {bw / 1e12:.2f} TB/s measured in the same run; {sms} SMs; "
        f'{lean.CONFIG.get()}. Lean returns the log-sum-exp as well (SDPA does not). "Fixed split" runs the same kernel with '
        'every head cut into the same number of splits (FlashDecoding-style), not stream-K. "Lean / SDPA" > 1 means '
        "Lean is faster. Graph times replay 10 calls from a CUDA graph; eager times launch them from Python."
    )
    batches, heads, contexts = (
        ((1, 8), ((1, 8), (8, 4)), (8 * K, 32 * K, 128 * K, 1024 * K))
        if quick
        else ((1, 2, 8), ((1, 8), (2, 4), (8, 4)), (8 * K, 32 * K, 128 * K, 256 * K, 1024 * K))
    )
    for B, (hkv, group), S in itertools.product(batches, heads, contexts):
        q, k, v, mask = _decode_inputs(B, hkv, group, S)
        nbytes = 2 * k.numel() * k.element_size()
        graph = graph_timed(lambda: lean.lean_attend(q, k, v, mask))
        eager = timed(lambda: lean.lean_attend(q, k, v, mask))
        sdpa = graph_timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        n_heads = B * hkv
        splits = max(1, lean.default_programs(q.device) // n_heads)
        fixed = graph_timed(lambda: lean.lean_attend(q, k, v, mask, programs=n_heads * splits))
        diff = (
            (
                lean.lean_attend(q, k, v, mask)[0].float()
                - F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
            )
            .abs()
            .max()
            .item()
        )
        row = [
            B,
            hkv,
            group,
            S,
            nbytes / 1e6,
            graph * 1e6,
            100 * nbytes / graph / bw,
            eager * 1e6,
            sdpa * 1e6,
            sdpa / graph,
            fixed * 1e6,
            fixed / graph,
            f"{diff:.1e}",
        ]
        table.rows.append(row)
        rec.emit(
            dict(
                zip(
                    [
                        "batch",
                        "kv_heads",
                        "group",
                        "context",
                        "kv_mb",
                        "lean_graph_us",
                        "pct_copy",
                        "lean_eager_us",
                        "sdpa_graph_us",
                        "lean_over_sdpa",
                        "fixed_graph_us",
                        "streamk_gain",
                        "max_abs_diff",
                    ],
                    row[:-1] + [diff],
                )
            ),
            part="decode",
        )
        del q, k, v
    return table


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
    return KeySummary(
        block,
        blocks.amin(3),
        blocks.amax(3),
        count,
        starts,
        starts + block - 1,
        torch.zeros(B, H, dtype=torch.int32, device=k.device),
    )


def bench_hsr(rec: Recorder, quick: bool = False, profile: bool = False) -> list[Table]:
    """HSR's sparse decode attention alone against dense Lean and SDPA, over caches planted so that a known share of
    key blocks matters (`profile`: GPU time per kernel of one step)."""
    from longctx.attention.hsr import PROBE_EVERY, hsr_attend

    eps, block, sink, recent = 1e-3, 64, 64, 256
    table = Table(
        "HSR sparse decode attention vs dense Lean and SDPA, by share of key blocks read",
        "python tools/benchmarks.py hsr",
        [
            "batch",
            "context",
            "KV MB",
            "blocks planted",
            "blocks read",
            "HSR graph (µs)",
            "HSR selecting every call (µs)",
            "of which selection (µs)",
            "Lean graph (µs)",
            "SDPA graph (µs)",
            "Lean / HSR",
            "SDPA / HSR",
            "largest certificate",
            "max abs diff vs Lean",
        ],
    )
    table.figure = "hsr"
    table.notes.append(
        f"bf16, 8 KV heads x 4 query heads (Llama-3.1-8B's attention), head dim 128, one query token; decode.eps {eps}, "
        f"decode.block {block}, sink {sink}, recent {recent}. Keys are planted so that the share of blocks in 'blocks "
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
    for B, S in ((1, 32 * K), (1, 128 * K), (1, 1024 * K), (8, 32 * K), (8, 128 * K)) + (
        () if quick else ((8, 1024 * K),)
    ):
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
            t = (
                graph_timed(
                    lambda: (hsr_attend(q, k, v, mask, summary, eps, sink, recent), mask.q_pos.add_(1)), PROBE_EVERY
                )
                - advance
            )
            mask.q_pos.fill_(S - 1)
            clear = graph_timed(summary.dense_until.zero_, PROBE_EVERY)
            selecting = (
                graph_timed(
                    lambda: (summary.dense_until.zero_(), hsr_attend(q, k, v, mask, summary, eps, sink, recent)),
                    PROBE_EVERY,
                )
                - clear
            )
            final = graph_timed(lambda: lean.lean_sparse_attend(q, k, v, mask, tiles, n, block))
            read = float(r.blocks_read.float().mean() / r.blocks_visible)
            diff = (r.out.float() - lean.lean_attend(q, k, v, mask)[0].float()).abs().max().item()
            row = [
                B,
                S,
                nbytes / 1e6,
                f"{len(hot) / nb:.1%}",
                f"{read:.1%}",
                t * 1e6,
                selecting * 1e6,
                (selecting - final) * 1e6,
                dense * 1e6,
                sdpa * 1e6,
                dense / t,
                sdpa / t,
                f"{float(r.certificate.max()):.1e}",
                f"{diff:.1e}",
            ]
            table.rows.append(row)
            rec.emit(
                dict(
                    zip(
                        [
                            "batch",
                            "context",
                            "kv_mb",
                            "planted",
                            "read_share",
                            "hsr_graph_us",
                            "selecting_us",
                            "selection_us",
                            "lean_graph_us",
                            "sdpa_graph_us",
                            "lean_over_hsr",
                            "sdpa_over_hsr",
                            "max_certificate",
                            "max_abs_diff",
                        ],
                        row[:3] + [len(hot) / nb, read] + row[5:12] + [float(r.certificate.max()), diff],
                    )
                ),
                part="hsr",
            )
            print(table.rows[-1], flush=True)
            if profile and share == 0.05:
                table.notes.append(
                    _profile_hsr(
                        lambda: hsr_attend(q, k, v, mask, summary, eps, sink, recent), f"batch {B}, context {S:,}, 5%"
                    )
                )
            del summary, r
        del q, k, v
        torch.cuda.empty_cache()
    return [table]


def _profile_hsr(step: Callable, title: str) -> str:
    """GPU time per kernel of one HSR step (eager), averaged over 5."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total
    )
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


def bench_prefill(rec: Recorder, quick: bool = False, tune: bool = False) -> list[Table]:
    """Phase-1 attention by shape: each fused kernel and FlexAttention alone, then the project's `attend`, which
    picks one (attention.fused.FUSED_KERNELS) and splits star's mask into pieces; with `tune`, FlexAttention's kernel
    options too."""
    from longctx.attention import fused
    from longctx.attention.kernels import attend, fused_plan

    table = Table(
        "phase-1 attention by shape: fused SDPA kernels vs compiled FlexAttention, and the path attend() takes",
        "python tools/benchmarks.py prefill",
        [
            "heads (q/kv, dim)",
            "mask",
            "queries",
            "keys",
            "cuDNN TFLOP/s",
            "flash TFLOP/s",
            "Flex TFLOP/s",
            "attend() path",
            "attend() TFLOP/s",
            "attend() / Flex",
            "max abs diff vs Flex",
        ],
    )
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
    ops = {
        "cudnn": fused.cudnn_kernel,
        "flash": lambda q, k, v, c: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, c, False)[:2],
    }
    lengths = (32 * K, 128 * K) if quick else (8 * K, 32 * K, 128 * K)
    for (hq, hkv, D), S in itertools.product(((32, 8, 128), (4, 1, 256)), lengths):
        pos = torch.arange(S, device="cuda")
        shapes = {
            "causal": (PositionMask(pos, pos), S * (S + 1) // 2, True),
            "full": (PositionMask(pos + S, pos), S * S, False),
            "star, 4 blocks": (
                PositionMask(pos, pos, block_size=S // 4, anchor_size=S // 4),
                4 * (S // 4) * (S // 4 + 1) // 2 + 3 * (S // 4) ** 2,
                None,
            ),
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
            t_flex = timed(
                lambda: flex(
                    q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, kernel_options=flex_options(q)
                ),
                3,
            )
            plan = fused_plan(q, k, mask)
            path = (
                "Flex"
                if plan is None
                else f"{fused.FUSED_KERNELS.get()[torch.cuda.get_device_capability()]}, {len(plan[1])} call(s)"
            )
            t_attend = timed(lambda: attend(q, k, v, mask, return_lse=True), 3)
            diff = (
                (attend(q, k, v, mask).float() - flex(q, k, v, block_mask=block_mask, enable_gqa=True)[0].float())
                .abs()
                .max()
                .item()
            )
            row += [tflops(t_flex), path, tflops(t_attend), t_flex / t_attend, f"{diff:.1e}"]
            table.rows.append(row)
            rec.emit(
                dict(
                    zip(
                        [
                            "heads",
                            "mask",
                            "queries",
                            "keys",
                            "cudnn_tflops",
                            "flash_tflops",
                            "flex_tflops",
                            "path",
                            "attend_tflops",
                            "attend_over_flex",
                        ],
                        row[:-1],
                    ),
                    max_abs_diff=diff,
                ),
                part="prefill",
            )
            del block_mask
        del q, k, v
    return [table] + ([tune_flex(rec, quick)] if tune else [])


def tune_flex(rec: Recorder, quick: bool) -> Table:
    """FlexAttention's kernel options on causal prefill, against SDPA (`prefill --tune`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = Table(
        "causal prefill attention: FlexAttention kernel options vs SDPA",
        "python tools/benchmarks.py prefill --tune",
        [
            "context",
            "SDPA backend",
            "SDPA TFLOP/s",
            "flex variant",
            "flex TFLOP/s",
            "flex / SDPA",
            "star mask (4 blocks) speed-up",
        ],
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
                times[name] = timed(
                    lambda: flex(q, k, v, block_mask=causal, enable_gqa=True, return_lse=True, kernel_options=opts), 3
                )
            except Exception as e:
                print(f"flex {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        fastest = min(times, key=times.get)
        t_star = timed(
            lambda: flex(q, k, v, block_mask=star, enable_gqa=True, return_lse=True, kernel_options=variants[fastest]),
            3,
        )
        for name, t in sorted(times.items(), key=lambda x: x[1]):
            row = [
                S,
                backend,
                flops / t_sdpa / 1e12,
                name,
                flops / t / 1e12,
                t_sdpa / t,
                times[fastest] / t_star if name == fastest else float("nan"),
            ]
            table.rows.append(row)
            rec.emit(
                dict(
                    zip(
                        [
                            "context",
                            "sdpa_backend",
                            "sdpa_tflops",
                            "flex_variant",
                            "flex_tflops",
                            "flex_over_sdpa",
                            "star_speedup",
                        ],
                        row,
                    )
                ),
                part="flex-tune",
            )
        del q, k, v
    return table


# --- batch-1 projections


def bench_gemv(rec: Recorder, quick: bool = False) -> list[Table]:
    """Batch-1 projections of Llama-3.1-8B shapes with the weight stored row-major (as checkpoints are) or
    column-major: the measurement behind `models.loading.COLUMN_MAJOR`."""
    from longctx.models.loading import COLUMN_MAJOR

    args, _ = llama3_args(0)
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {
        "attention.wqkv": (q + 2 * kv, args.dim),
        "attention.wo": (args.dim, q),
        "feed_forward.w13": (2 * args.intermediate_size, args.dim),
        "feed_forward.w2": (args.dim, args.intermediate_size),
        "output": (args.vocab_size, args.dim),
    }
    chosen = COLUMN_MAJOR.get(torch.cuda.get_device_capability(), ())
    table = Table(
        "batch-1 projections (GEMV) of Llama-3.1-8B shapes: weights stored row-major vs column-major",
        "python tools/benchmarks.py gemv",
        [
            "projection",
            "weight",
            "row-major (µs)",
            "TB/s",
            "column-major (µs)",
            "TB/s",
            "column / row speed",
            "stored column-major",
        ],
    )
    table.figure = "gemv"
    bw = copy_bandwidth()
    table.notes.append(
        f"bf16, x [1, 1, in] @ Wᵀ through F.linear. Each weight is one of as many copies as exceed 256 MB, called in "
        f"turn, so that reads come from HBM as in a decode step (not from the 50 MB L2); graph times. Copy bandwidth "
        f'{bw / 1e12:.2f} TB/s in the same run. "stored column-major": `models.loading.COLUMN_MAJOR` for this GPU.'
    )
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        rows = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        cols = [w.t().contiguous().t() for w in rows]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        t_row = graph_timed(lambda: [F.linear(x, w) for w in rows]) / copies
        t_col = graph_timed(lambda: [F.linear(x, w) for w in cols]) / copies
        row = [
            name,
            f"{n:,} x {k:,}",
            t_row * 1e6,
            nbytes / t_row / 1e12,
            t_col * 1e6,
            nbytes / t_col / 1e12,
            t_row / t_col,
            "yes" if name in chosen else "no",
        ]
        table.rows.append(row)
        rec.emit(
            dict(zip(["projection", "shape", "row_us", "row_tbs", "col_us", "col_tbs", "col_speedup", "chosen"], row)),
            part="gemv",
        )
        del rows, cols
    return [table]
