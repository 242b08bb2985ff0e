"""The memory plan of a run: what each rank holds at its peak, term by term, computed without loading anything.

A rank's peak is its weights and KV cache (allocated in full before phase 1) plus the largest transient of the run,
which for a long context is one layer of phase 1: the residual stream, the attention of the rank's tokens (with
the strategy's extra buffers: ring's shard in flight and fp32 running output, star's received anchor) or the MLP
over one chunk of tokens, whichever is larger, plus the rotary tables that live through the whole pass. Phase 2
and decode are small next to it except for the attention workspace over the whole KV cache, which is a term too.

Each term follows the tensors `models.transformer` and `attention` allocate; tests/test_memory_plan.py checks the
sum against the bytes actually live on CPU at small scale, and BENCHMARKS.md against the CUDA allocator's peak.
`runtime` (the CUDA context, or the Python process itself) is not allocated by torch and is added only when the
plan is compared with what a device has free.
"""

from __future__ import annotations

import gc
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from longctx import attention
from longctx.attention.dense import MASK_CHUNK_ELEMENTS
from longctx.attention.fused import MAX_CAUSAL_SQUARE
from longctx.attention.kernels import CPU_FLASH_MIN_QUERIES, DEQUANT_SLOTS, FLEX_MIN_QUERIES, flex_bucket
from longctx.attention.merge import MERGE_CHUNK_ELEMENTS
from longctx.attention.quant import FP8_CAPABILITY, ONE_BYTE, VALUE_TILE, is_quantized, value_tiles
from longctx.models.config import ModelArgs
from longctx.models.transformer import FeedForward, Transformer
from longctx.parallel.tensor import TensorParallel, local_args, valid_degrees

GiB = 2**30
# Not tensors: the CUDA context with cuBLAS/Triton modules; on CPU the interpreter with torch, Hydra and a tokenizer,
# and the heap the C allocator keeps after tensors are freed (measured on the real small models: BENCHMARKS.md).
RUNTIME_BYTES = {"cuda": int(0.75 * GiB), "cpu": int(0.8 * GiB)}
# Caching-allocator fragmentation and kernel workspaces the terms do not name, as a fraction of the peak.
SLACK = 0.05
FLEX_BLOCK = 128  # FlexAttention's BlockMask granularity (tokens per block, both sides)
DECODE_QUERY_TOKENS = 1


@dataclass(frozen=True)
class RunShape:
    """What a run feeds: `n_ctx` context tokens in phase 1, then `n_after` query and generated tokens, of which the
    first `n_query` go through phase 2 in one pass (None: as many as `n_after`, the most there can be)."""

    n_ctx: int
    n_after: int
    n_query: int | None = None


@dataclass
class RankPlan:
    rank: int
    terms: dict[str, int] = field(default_factory=dict)  # name -> bytes, in the order of the table

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class Plan:
    model: str
    strategy: str
    world: int  # all ranks: hosts × tp
    device: str
    dtype: torch.dtype
    shape: RunShape
    ranks: list[RankPlan]
    tp: int = 1

    @property
    def peak(self) -> int:
        """Bytes the fullest rank allocates (tensors only)."""
        return max(r.total for r in self.ranks)

    @property
    def need(self) -> int:
        """Bytes of device memory the fullest rank needs free: its tensors, slack and the runtime."""
        return int(self.peak * (1 + SLACK)) + RUNTIME_BYTES[self.device]

    def table(self) -> str:
        """Per-rank, per-term table (GiB, or MiB for a small run); ranks with the same terms are shown once."""
        groups: dict[tuple, list[int]] = {}
        for r in self.ranks:
            groups.setdefault(tuple(r.terms.items()), []).append(r.rank)
        cols = [(_ranks_label(ranks), dict(terms)) for terms, ranks in groups.items()]
        names = list(dict.fromkeys(n for _, t in cols for n in t))
        unit, scale = ("GiB", GiB) if self.peak >= GiB else ("MiB", 2**20)
        fmt = lambda n: f"{n / scale:.2f}"  # noqa: E731
        rows = [["term", *(c for c, _ in cols)]]
        rows += [[n, *(fmt(t.get(n, 0)) for _, t in cols)] for n in names]
        rows += [["total (tensors)", *(fmt(sum(t.values())) for _, t in cols)]]
        rows += [
            [
                f"needed free: + {SLACK:.0%} slack + {self.device} runtime",
                *(fmt(int(sum(t.values()) * (1 + SLACK)) + RUNTIME_BYTES[self.device]) for _, t in cols),
            ]
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        where = f"{self.world} rank{'s' * (self.world > 1)}" + (
            f" ({self.world // self.tp} hosts × tp={self.tp})" if self.tp > 1 else ""
        )
        head = (
            f"memory plan ({unit} per rank): {self.model}, {self.strategy} on {where}, "
            f"{self.shape.n_ctx} context + {self.shape.n_after} more tokens, {str(self.dtype).removeprefix('torch.')} "
            f"on {self.device}"
        )
        return head + "\n" + "\n".join(lines)


def _ranks_label(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return (
        f"ranks {ranks[0]}-{ranks[-1]}"
        if ranks == list(range(ranks[0], ranks[-1] + 1))
        else "ranks " + ",".join(map(str, ranks))
    )


def weight_bytes(args: ModelArgs, dtype: torch.dtype, tp: int = 1) -> int:
    """Parameters (tied ones once) in `dtype` that one of `tp` tensor-parallel ranks holds, and the fp32 rotary
    frequencies, counted on a meta-device model cut as `parallel.tensor` cuts it."""
    key = (repr(args), dtype, tp)
    if key not in _WEIGHTS:  # (a plan searching for what fits asks many times)
        with torch.device("meta"):
            model = Transformer(args)
        TensorParallel(args, tp, 0).parallelize(model)
        params = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        _WEIGHTS[key] = params + sum(b.numel() * b.element_size() for b in model.buffers())
    return _WEIGHTS[key]


_WEIGHTS: dict[tuple[str, torch.dtype, int], int] = {}


def plan_run(
    args: ModelArgs,
    strategy: attention.AttentionStrategy,
    shape: RunShape,
    world: int,
    dtype: torch.dtype,
    device: str,
    model_name: str = "",
    tp: int = 1,
) -> Plan:
    """The plan of every rank of `world` hosts running `strategy` (as built for host 0; each host is planned from
    `strategy.at(host, world)`) over `shape`, each host `tp` ranks holding a tensor-parallel slice of the model."""
    weights, local = weight_bytes(args, dtype, tp), local_args(args, tp)
    hosts = [_rank_plan(local, strategy.at(h, world), shape, dtype, device, weights) for h in range(world)]
    ranks = [RankPlan(h * tp + t, hosts[h].terms) for h in range(world) for t in range(tp)]
    return Plan(model_name or args.architecture, strategy.name, world * tp, device, dtype, shape, ranks, tp)


def _rank_plan(
    args: ModelArgs, s: attention.AttentionStrategy, shape: RunShape, dtype: torch.dtype, device: str, weights: int
) -> RankPlan:
    b = dtype.itemsize
    D, Hkv, Hq = args.head_dim, args.n_kv_heads, args.n_heads
    slots = s.cache_slots(shape.n_ctx, shape.n_after)
    one_byte = is_quantized(s.kv_dtype)
    # keys and values as stored (FP8 or int8: a byte each and a scale's exponent per token and KV head), the slots'
    # positions (and their index), what the decode method keeps beside them
    # (one-byte values fill whole tiles of keys: attention.quant.tile_values)
    if one_byte:
        stored = Hkv * (D + 2) * slots + Hkv * D * value_tiles(slots) * VALUE_TILE
    else:
        stored = 2 * Hkv * D * (s.kv_dtype or dtype).itemsize * slots
    kv = args.n_layers * (stored + s.decode.cache_bytes(slots, Hkv, D, b)) + 2 * slots * 8
    # phase 1: a pass of T tokens, attending to the cache (or what the strategy says)
    T = s.pass_tokens(shape.n_ctx) if shape.n_ctx else 0
    m = s.phase1_memory(shape.n_ctx, T, Hq, Hkv, D, b)
    keys = s.kept_context(shape.n_ctx) if m.keys is None else m.keys
    phase1 = (
        _layer_peak(
            args,
            T,
            keys,
            b,
            device,
            m.keys_seen,
            m.buffers,
            m.merging,
            one_piece=m.one_piece,
            one_byte=one_byte and m.keys is None,
        )
        if T
        else 0
    )
    rotary = _rotary_bytes(args, T, b)
    # phase 2: the query tokens (at most n_after), then one token at a time, attending to the whole local cache
    Q = max(1, shape.n_after if shape.n_query is None else min(shape.n_query, shape.n_after))
    workspace = s.decode.workspace_bytes(Hq, Hkv, D, Q, slots, b)
    phase2 = _layer_peak(args, Q, slots, b, device, workspace=workspace, one_byte=one_byte) + _rotary_bytes(args, Q, b)
    logits = args.vocab_size * (b + 4) * 2  # the last position's logits, and their fp32 copy for sampling
    terms = {"weights": weights, "KV cache": kv}
    transient = {"phase 1: one layer's activations": phase1 + rotary, "phase 2: one layer's activations": phase2}
    name = max(transient, key=transient.get)
    terms[name] = transient[name]
    terms["logits"] = logits
    if device == "cuda":
        # a decode step's own tensors live on in the CUDA graph's private pool
        terms["CUDA graph pool"] = _layer_peak(args, DECODE_QUERY_TOKENS, slots, b, device, one_byte=one_byte) + logits
    return RankPlan(s.rank, terms)


def _rotary_bytes(args: ModelArgs, T: int, b: int) -> int:
    """Frequencies (fp32), their doubled copy (fp32), cos and sin: live through the whole forward pass."""
    return len(args.ropes()) * T * args.rotary_dim * (2 + 4 + 2 * b) + T * 8 * 2


def _layer_peak(
    args: ModelArgs,
    T: int,
    S: int,
    b: int,
    device: str,
    seen: int | None = None,
    extra: int = 0,
    merging: int = 0,
    workspace: int | None = None,
    one_piece: bool = False,
    one_byte: bool = False,
) -> int:
    """The most bytes one layer holds at once over T tokens attending to S keys (star: `seen`, the block and anchor
    sizes, bounds the keys beyond its own a query sees): the largest of the moments below, as `models.transformer`
    allocates them; `extra`: the strategy's own buffers during attention, `merging`: its merge's temporaries,
    `workspace`: the attention's own (default: the dense kernel's, `_kernel_workspace`, with `one_piece`);
    `one_byte`: the S keys are stored in FP8 or int8, which the kernels read DEQUANT_SLOTS at a time (but the Lean
    kernel in place), with the queries rotated to the frame they are stored in or the keys back to theirs, whichever
    are fewer rows (a copy of q, or of a piece's keys as dequantized: `attention.kernels.rotates_keys`)."""
    D, Hq, Hkv, dim, inter = args.head_dim, args.n_heads, args.n_kv_heads, args.dim, args.intermediate_size
    if one_byte:
        extra += min(T * Hq, S * Hkv) * D * b
    if one_byte and not (device == "cuda" and T < FLEX_MIN_QUERIES):
        piece = min(S, DEQUANT_SLOTS)
        extra += 2 * piece * Hkv * D * b + piece * Hkv * D  # a piece's keys and values at full width (the values'
        # codes copied out of their tiles first)
        if S > piece:  # the pieces' partials merged: on CUDA in q's dtype (the output so far and the merged one,
            if device == "cuda":  # with their lse), elsewhere into fp32, a chunk of rows at a time
                extra += 2 * T * Hq * (D * b + 4)
            else:
                extra += T * Hq * (D + 1) * 4
                merging = max(merging, 6 * min(T * Hq * D, MERGE_CHUNK_ELEMENTS) * 4)
        S = piece
    row = T * b
    eager = device != "cuda"  # on CUDA the elementwise chains are fused kernels without temporaries
    qkv = (Hq + 2 * Hkv) * D
    # attention: the layer input, its norm, the fused q|k|v, rotated q and k ...
    live = row * (2 * dim + qkv + (Hq + Hkv) * D)
    rotary = row * (2 * dim + qkv + (Hq + Hkv) * D * args.qk_norm + (3 if eager else 1) * Hq * D)
    if workspace is None:
        workspace = _kernel_workspace(args, T, S, b, device, seen, one_piece)
    kernel = live + extra + max(workspace, merging)
    output = live + row * (2 * Hq * D + dim) + T * Hq * 4  # ... the output, its [T, heads*dim] copy, wo's output
    # MLP: the layer input, the attention output, their sum, its norm (and the chunked output), one chunk's gate|up,
    # activation (and the unfused activation's temporary) and down projection; then the block's output
    chunk = min(T, FeedForward.chunk)
    resid = row * dim * (4 + (T > chunk))
    mlp = resid + chunk * b * max(3 * inter + dim, 4 * inter if eager else 0)
    block_out = row * dim * (6 + (T > chunk) + args.sandwich_norms)
    return max(rotary, kernel, output, mlp, block_out)


def _kernel_workspace(
    args: ModelArgs, T: int, S: int, b: int, device: str, seen: int | None, one_piece: bool = False
) -> int:
    """Bytes the attention kernel holds beyond its inputs, for T queries over S keys (`attention.kernels.attend`);
    `one_piece`: the mask is one causal square (global phase 1), which the fused path runs without merging."""
    D, Hq, Hkv = args.head_dim, args.n_heads, args.n_kv_heads
    out = T * Hq * D * b + T * Hq * 4  # output and lse
    windows = len(set(args.layer_windows)) or 1
    if device == "cuda" and T >= FLEX_MIN_QUERIES:  # FlexAttention: its BlockMasks (4 int32 [T/128, S/128] tables)
        Tb, Sb = flex_bucket(T), flex_bucket(S)  # over lengths padded to their buckets, copies of q, k, v and out
        padded = (2 * Tb * Hq + 2 * Sb * Hkv) * D * b if (Tb, Sb) != (T, S) else 0
        flex = out + padded + windows * 4 * 4 * math.ceil(Tb / FLEX_BLOCK) * math.ceil(Sb / FLEX_BLOCK)
        # fused pieces (attention.fused): one piece is the output. Of several, the causal ones run first: squares of
        # one size batched, their kernel's result beside copies of q, k, v cut into squares (freed when it returns),
        # then that result and its rows' copy, which becomes the output; each later piece's result then merges
        # into the output, the merged rows a third tensor of at most T rows
        if one_piece and T <= MAX_CAUSAL_SQUARE:
            return max(flex, out)
        squares = T * Hq * D * b + 2 * min(S, T) * Hkv * D * b  # (a causal piece's keys are its rows')
        return max(flex, out + squares, 3 * out)
    if device == "cuda":  # Lean decode: partial (output, lse) per program and row, a few per SM
        return out + 4 * 132 * 2 * Hq * T * (D + 1) * 4
    rows = min(T, max(64, MASK_CHUNK_ELEMENTS // max(S, 1)))
    windowed = seen is not None or any(w is not None for w in args.layer_windows)
    seen = S if seen is None else min(S, rows + seen)  # a star chunk: its queries' blocks and the anchor
    # a chunk's boolean mask: made by 2 or 3 boolean [rows, S] comparisons; then with its negation for the bias
    mask = max(3 * rows * S if windowed else 2 * rows * S, 2 * rows * S + rows * seen * b)
    if T >= CPU_FLASH_MIN_QUERIES:
        # fused CPU kernel: K/V repeated to Hq heads, the keys a chunk sees gathered (star); per chunk the mask and an
        # additive bias, next to the outputs so far; at the end the chunks' outputs and their concatenation
        expanded = 2 * S * Hq * D * b if Hq > Hkv else 0
        gathered = 2 * seen * Hq * D * b if seen < S else 0
        return expanded + gathered + max(mask + out, 2 * out)
    # dense reference: fp32 K/V, a chunk's fp32 scores and probabilities
    return 2 * S * Hkv * D * 4 + max(mask + 2 * rows * Hq * seen * 4 + out, 2 * out)


# --- a run's plan from its config, and the check before loading


def run_shape(task, ctx_length: int) -> RunShape:
    """The tokens a task feeds: bench and plan a prompt of `prompt_tokens` (default the ctx length) whose last
    `query_tokens` go through phase 2; generate and ruler the ctx length, a query, and `max_new_tokens`."""
    if task.name in ("bench", "plan"):
        n = task.get("prompt_tokens") or ctx_length
        return RunShape(max(1, n - task.query_tokens), task.query_tokens + task.new_tokens, task.query_tokens)
    n = max(task.get("lengths") or [ctx_length])
    return RunShape(n, QUERY_ALLOWANCE + task.max_new_tokens, QUERY_ALLOWANCE)


QUERY_ALLOWANCE = 256  # tokens of a question and chat template after the context, for tasks that do not fix them


def plan_config(cfg, world: int | None = None, n_ctx: int | None = None, dtype: torch.dtype | None = None) -> Plan:
    """The plan of the run `cfg` describes (a runner config), optionally with another rank count, context or dtype."""
    from longctx.preflight.options import resolve_device, resolve_dtype, resolve_kv_dtype

    world = world or cfg.parallel.nproc
    tp = cfg.parallel.get("tp", 1)
    if world % tp:
        raise ValueError(f"{world} ranks are not hosts of parallel.tp={tp} ranks each")
    device = resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    shape = run_shape(cfg.task, cfg.ctx.length)
    if n_ctx is not None:
        shape = RunShape(n_ctx, shape.n_after, shape.n_query)
    args = ModelArgs.from_preset(cfg.model)
    kv = cfg.get("kv") or {}
    strategy = attention.from_config(
        cfg.attention,
        cfg.get("decode"),
        shape.n_ctx,
        world // tp,
        kv_dtype=resolve_kv_dtype(kv.get("dtype", "auto")),
        chunk=(cfg.get("ctx") or {}).get("chunk"),
    )
    return plan_run(args, strategy, shape, world // tp, dtype, device.type, cfg.model.name, tp)


class DoesNotFit(ValueError):
    """The plan needs more memory than a rank has; the message names what, how much, and what would fit."""


def available_bytes(device: torch.device, world: int, limit_gib: float | None) -> tuple[int, str]:
    """Memory one rank may use, and where that figure comes from: `memory.limit_gib` where set, else the GPU's free
    memory, or on CPU the host's available memory shared by the ranks."""
    if limit_gib is not None:
        return int(limit_gib * GiB), f"memory.limit_gib={limit_gib}"
    if device.type == "cuda":
        gc.collect()  # an earlier run in this process (a -m sweep) may leave tensors only the collector frees
        free, _ = torch.cuda.mem_get_info(device)
        # what this process's allocator has reserved but does not use is free to this run too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free, f"{device} has {free / GiB:.1f} GiB free"
    avail = _host_available()
    share = f" ({world} ranks share it)" if world > 1 else ""
    return avail // world, f"the host has {avail / GiB:.1f} GiB available{share}"


def _host_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(cfg, device: torch.device) -> Plan:
    """The run's plan, if its fullest rank fits in what `available_bytes` allows; else `DoesNotFit` with the
    smallest changes that fit, each computed from the same plan. Where `ctx.chunk` is unset and the default chunk
    is what does not fit, the largest chunk that fits is set in `cfg` instead (and said)."""
    plan = plan_config(cfg)
    avail, source = available_bytes(device, plan.world, cfg.memory.get("limit_gib"))
    if plan.need <= avail:
        return plan
    chunk = _largest_chunk(cfg, avail, plan.shape.n_ctx) if cfg.get("ctx", {}).get("chunk") is None else None
    if chunk is not None:
        cfg.ctx.chunk = chunk
        print(
            f"ctx.chunk={chunk}: phase 1 feeds {chunk} tokens per pass, as {attention.strategy.AUTO_CHUNK} would not "
            f"fit ({source})",
            file=sys.stderr,
            flush=True,
        )
        return plan_config(cfg)
    terms = max(plan.ranks, key=lambda r: r.total).terms
    parts = ", ".join(f"{name.split(':')[0]} {n / GiB:.1f}" for name, n in terms.items() if n >= 0.05 * GiB)
    shared = avail * plan.world if device.type == "cpu" and cfg.memory.get("limit_gib") is None else None
    # (a GPU run planned where there is none may name FP8; a GPU that cannot compute with it, int8)
    fp8_ok = (
        device.type != "cuda"
        or not torch.cuda.is_available()
        or torch.cuda.get_device_capability(device) >= FP8_CAPABILITY
    )
    fixes = fits_with(cfg, avail, shared, fp8_ok)
    advice = (
        f"; fits with {' or '.join(fixes)}"
        if fixes
        else "; no rank count, shorter ctx or dtype fits: use a smaller model"
    )
    raise DoesNotFit(
        f"memory: {cfg.model.name} with {plan.strategy} at {plan.shape.n_ctx} tokens on {plan.world} "
        f"rank{'s' * (plan.world > 1)} needs {plan.need / GiB:.1f} GiB per rank ({parts} GiB, plus slack and runtime; "
        f"`task=plan` shows every term), but {source}{advice}"
    )


RANK_COUNTS = (2, 4, 8, 16, 32, 64, 128)


def _largest_chunk(cfg, avail: int, n_ctx: int) -> int | None:
    """The largest of CHUNKS below the configured chunk that fits in `avail` at a context of `n_ctx` tokens, if any."""
    from omegaconf import OmegaConf

    current = min(cfg.get("ctx", {}).get("chunk") or attention.strategy.AUTO_CHUNK, n_ctx)
    for chunk in (c for c in CHUNKS if c < current):
        try:
            if plan_config(OmegaConf.merge(cfg, {"ctx": {"chunk": chunk}}), n_ctx=n_ctx).need <= avail:
                return chunk
        except ValueError:  # a layout that cannot be chunked (ring across ranks)
            return None
    return None


CHUNKS = (32768, 16384, 8192, 4096)  # phase-1 chunks a fix may name


def fits_with(cfg, avail: int, shared: int | None = None, fp8_ok: bool = True) -> list[str]:
    """The smallest change of each kind that fits in `avail` bytes per rank: the KV cache in one byte (FP8 where
    `fp8_ok`, the device can compute with it; int8 where not) or a smaller phase-1 chunk (both, where neither alone
    fits), before more ranks, a shorter context, bf16. `shared`: the bytes all ranks share (CPU ranks on one host),
    where fewer ranks leave each more."""
    from omegaconf import OmegaConf

    fixes = []
    base = plan_config(cfg)
    one_byte = None if cfg.get("kv", {}).get("dtype") in ONE_BYTE else "fp8" if fp8_ok else "int8"
    smaller = OmegaConf.merge(cfg, {"kv": {"dtype": one_byte}}) if one_byte else None
    if smaller is not None and plan_config(smaller).need <= avail:
        fixes.append(f"kv.dtype={one_byte}")
    chunk = _largest_chunk(cfg, avail, base.shape.n_ctx)
    if chunk is not None:
        fixes.append(f"ctx.chunk={chunk}")
    elif smaller is not None and not fixes and (chunk := _largest_chunk(smaller, avail, base.shape.n_ctx)) is not None:
        fixes.append(f"kv.dtype={one_byte} ctx.chunk={chunk}")
    if shared is not None:  # the most ranks below the requested that fit the shared memory
        for n in range(base.world - base.tp, 0, -base.tp):
            try:
                if plan_config(cfg, world=n).need <= shared // n:
                    fixes.append(f"parallel.nproc={n}")
                    break
            except ValueError:  # (a layout the strategy refuses)
                continue
    alternative = attention.strategy_class(cfg.attention.name).across_hosts  # (a strategy of one host names another)
    spread = cfg if alternative is None else OmegaConf.merge(cfg, {"attention": {"name": alternative}})
    for n in (n for n in RANK_COUNTS if n > base.world and n % base.tp == 0):  # more hosts
        try:
            if plan_config(spread, world=n).need <= avail:
                fixes.append((f"attention={alternative} " if spread is not cfg else "") + f"parallel.nproc={n}")
                break
        except ValueError:  # e.g. more ranks than the strategy cuts the context into
            continue
    hosts = base.world // base.tp
    for tp in (
        d for d in valid_degrees(ModelArgs.from_preset(cfg.model)) if d > base.tp and hosts * d <= RANK_COUNTS[-1]
    ):  # more GPUs per host
        wider = OmegaConf.merge(cfg, {"parallel": {"tp": tp}})
        if plan_config(wider, world=hosts * tp).need <= avail:
            fixes.append(f"parallel.nproc={hosts * tp} parallel.tp={tp}")
            break
    # the longest context that fits (with an unset chunk, in the chunk `check_fits` would shrink it to): lo fits (or
    # is 0), hi does not
    unset = cfg.get("ctx", {}).get("chunk") is None
    lo, hi = 0, base.shape.n_ctx
    while hi - lo > max(1, hi // 256):
        mid = (lo + hi) // 2
        try:
            fits = plan_config(cfg, n_ctx=mid).need <= avail
        except ValueError:  # too short to cut over the ranks: shorter ones cannot run either
            lo = hi = 0
            break
        fits = fits or (unset and _largest_chunk(cfg, avail, mid) is not None)
        lo, hi = (mid, hi) if fits else (lo, mid)
    if lo >= 1024:
        fixes.append(f"ctx.length={lo // 1024 * 1024}")
    if base.dtype.itemsize > 2 and plan_config(cfg, dtype=torch.bfloat16).need <= avail:
        fixes.append("dtype=bf16")
    return fixes
