"""Lean Attention decode: the work over a long KV cache split evenly across all SMs (stream-K).

Decode gives each (batch, KV head) pair a long row of key tiles and almost no queries, so one program per head
leaves most SMs idle and a fixed split per head leaves some idle at the end. Here the B*Hkv*tiles units of work
are laid end to end and cut into one equal share per program, regardless of where heads begin and end. A program
walks its share; each time it finishes a head's stretch it has a partial (output, log-sum-exp) of that head.

GQA-aware: a program loads each key/value tile once for all query heads (and query tokens) of its KV head.

Where partials go is closed-form, so no per-shape plan crosses from host to device:
* program p's share is units [p*total//P, (p+1)*total//P); the program holding unit u is ((u+1)*P - 1)//total;
* head h's partials come from the programs holding its first and last units and all between (`head_parts`);
  program p stores its n-th head's partial in its n-th slot, n = h - (first unit of p)//tiles.

`lean_schedule` spells the split out segment by segment. `lean_reference` runs it in PyTorch (CPU, tests) and
combines each head's partials with the one merge (`attention.merge.merge_partials`). `lean_attend` runs it on CUDA
as two Triton launches and no other work: the stream-K kernel writes a head held by one program straight to the
output and the others as partials; a combine kernel merges those with the same rule, one (head, row) per program.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import Tensor

from longctx.attention.dense import dense_attend
from longctx.attention.mask import PositionMask
from longctx.attention.merge import merge_partials
from longctx.attention.settings import Setting

MAX_ROWS = 64  # query rows (query heads per KV head x query tokens) one program holds, where they fit (`_ROWS`)
# Query rows a program holds, per (head dim, query dtype, stored keys' dtype), where MAX_ROWS overflowed shared memory:
# Triton says what a kernel needs only when it is compiled for its launch, so the first launch that overflows lowers it
# (e.g. 64 rows of head dim 256 in bf16 need 289 KB with two stages, over an H100's 227 KB). One-byte keys have tiles
# and launch settings of their own, so an overflow there says nothing of full-width keys, and the reverse.
_ROWS: dict[tuple[int, torch.dtype, torch.dtype], int] = {}


def _rows_key(q: Tensor, k: Tensor) -> tuple[int, torch.dtype, torch.dtype]:
    return q.shape[-1], q.dtype, k.dtype


class LeanDoesNotFit(RuntimeError):
    """No program size of the Lean kernel fits this GPU's shared memory for the shape: use the dense path."""


@dataclass(frozen=True)
class LeanConfig:
    """Launch settings of the Triton kernel (BENCHMARKS.md, figure `lean-tune`: `decode --tune` on an H100)."""

    block_n: int = 128  # keys per tile
    warps: int = 4
    stages: int = 3
    programs_per_sm: int = 1
    min_tiles: int = 4  # tiles a program takes at least: a small cache goes to fewer programs, with fewer partials


# The settings every launch uses; a sweep of them (`decode --tune`) runs each with `CONFIG.scoped(config)`.
CONFIG: Setting[LeanConfig] = Setting("lean_config", LeanConfig())
# Over one-byte keys and values, whose tiles are converted in registers. FP8 in programs of up to FP8_ROWS query rows
# (decode): 256 keys a tile, 8 warps, one program per SM, the fastest of the settings `fp8-lean --tune` timed at 128K on
# an H100 (BENCHMARKS.md, figure `fp8-lean`).
FP8_CONFIG: Setting[LeanConfig] = Setting("lean_fp8_config", LeanConfig(block_n=256, warps=8, programs_per_sm=1))
FP8_ROWS = 16
# int8, and FP8 in programs of more rows (phase 2's short queries): two programs per SM of 128-key tiles. int8 ran
# faster under these than under FP8's; a program of 64 rows over FP8's 256-key tiles needs more shared memory than an
# H100 has, so it would hold half the rows and read the cache twice as often.
ONE_BYTE_CONFIG: Setting[LeanConfig] = Setting("lean_one_byte_config", LeanConfig(programs_per_sm=2))


def launch_setting(rows: int, stored: torch.dtype | None) -> Setting[LeanConfig]:
    """The settings a program of `rows` query rows launches with over keys `stored` in one byte (None: full width)."""
    if stored is None:
        return CONFIG
    return FP8_CONFIG if stored != torch.int8 and rows <= FP8_ROWS else ONE_BYTE_CONFIG


@dataclass(frozen=True)
class Segment:
    program: int
    slot: int  # the program's n-th partial
    head: int  # flat (batch, KV head) index
    tiles: tuple[int, int]  # [first, last) tile


def lean_schedule(heads: int, tiles: int, programs: int) -> list[Segment]:
    """Cut heads x tiles units into `programs` contiguous, equal (±1) shares; one segment per head a share touches."""
    total = heads * tiles
    segments = []
    for p in range(programs):
        unit, end, slot = p * total // programs, (p + 1) * total // programs, 0
        while unit < end:
            head, first = divmod(unit, tiles)
            stop = min(end, (head + 1) * tiles)
            segments.append(Segment(p, slot, head, (first, first + stop - unit)))
            unit, slot = stop, slot + 1
    return segments


def program_of(unit: int, total: int, programs: int) -> int:
    """The program whose share holds `unit` (the kernel computes the same)."""
    return ((unit + 1) * programs - 1) // total


def head_parts(head: int, tiles: int, total: int, programs: int) -> list[tuple[int, int]]:
    """(program, slot) of every partial of `head`, in key order (the combine kernel reads the same)."""
    first = program_of(head * tiles, total, programs)
    last = program_of((head + 1) * tiles - 1, total, programs)
    return [(p, head - (p * total // programs) // tiles) for p in range(first, last + 1)]


@cache
def max_slots(heads: int, tiles: int, programs: int) -> int:
    """Partials the busiest program writes: the heads its share touches."""
    total = heads * tiles
    return max(
        (((p + 1) * total // programs - 1) // tiles) - (p * total // programs) // tiles + 1 for p in range(programs)
    )


def lean_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, programs: int, block_n: int = LeanConfig.block_n
):
    """The Lean schedule executed in PyTorch: every segment is attention over its tiles, then the merge."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    heads, tiles = B * Hkv, -(-S // block_n)
    parts_out = torch.zeros(programs, max_slots(heads, tiles, programs), g * T, D, dtype=torch.float32, device=q.device)
    parts_lse = torch.full(parts_out.shape[:3], float("-inf"), device=q.device)
    for s in lean_schedule(heads, tiles, programs):
        b, h = divmod(s.head, Hkv)
        keys = slice(s.tiles[0] * block_n, min(s.tiles[1] * block_n, S))
        part = PositionMask(mask.q_pos, mask.kv_pos[keys], mask.window)
        o, l = dense_attend(
            q[b : b + 1, h * g : (h + 1) * g],
            k[b : b + 1, h : h + 1, keys],
            v[b : b + 1, h : h + 1, keys],
            part,
            return_lse=True,
        )
        parts_out[s.program, s.slot] = o[0].reshape(g * T, D).float()
        parts_lse[s.program, s.slot] = l[0].reshape(g * T).float()
    outs, lses = [], []
    for head in range(heads):
        prog, slot = map(list, zip(*head_parts(head, tiles, heads * tiles, programs)))
        o, l = merge_partials(parts_out[prog, slot], parts_lse[prog, slot])
        outs.append(o)
        lses.append(l)
    out, lse = torch.stack(outs), torch.stack(lses)
    return out.view(B, Hkv, g, T, D).reshape(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T)


def stages_that_fit(head_dim: int, itemsize: int, shared_memory: int, config: LeanConfig | None = None) -> int:
    """`config.stages`, or fewer where the K/V tiles of that many stages overflow shared memory; 0 if none fit.

    Triton holds the K and V tiles of max(1, stages - 1) steps in shared memory, plus up to about 32 KB of its own:
    at 128 keys x 128 dims in fp32 (or head dim 256 in bf16) three stages need 274 KB, over an H100's 227 KB.
    """
    config = config or CONFIG.get()
    ahead = (shared_memory - 32 * 1024) // (2 * config.block_n * head_dim * itemsize)
    return min(config.stages, 1 + ahead) if ahead > 0 else 0


@cache
def shared_memory(device: torch.device) -> int:
    """Shared memory one program may use; unlimited off CUDA, where only the interpreter runs the kernel."""
    if device.type != "cuda":
        return 1 << 30
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 96 * 1024)


def supports(q: Tensor, k: Tensor, mask: PositionMask) -> bool:
    """Shapes the Triton kernel takes: a GQA group within MAX_ROWS, power-of-two head dim whose tiles fit in shared
    memory, no star block mask."""
    group = q.shape[1] // k.shape[1]
    return (
        q.is_cuda
        and mask.block_size is None
        and group <= _ROWS.get(_rows_key(q, k), MAX_ROWS)
        and q.shape[-1] in (16, 32, 64, 128, 256)
        and stages_that_fit(q.shape[-1], q.element_size(), shared_memory(q.device)) > 0
        and _triton() is not None
    )


def _fitted(q: Tensor, config: LeanConfig, itemsize: int | None = None) -> LeanConfig:
    """`config` with as many pipeline stages as fit this GPU's shared memory for q's head dim and the K/V tiles'
    element size (default: q's)."""
    itemsize = itemsize or q.element_size()
    return replace(config, stages=stages_that_fit(q.shape[-1], itemsize, shared_memory(q.device), config))


@cache
def triton_available() -> bool:
    """Whether Triton can be imported (the kernel modules need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _triton():
    return importlib.import_module("longctx.attention.lean_triton") if triton_available() else None


def default_programs(device: torch.device, config: LeanConfig | None = None) -> int:
    """One share per SM (times `config`'s programs per SM, default CONFIG's); a fixed 16 off CUDA, where only the
    interpreter runs it."""
    return _processors(device) * (config or CONFIG.get()).programs_per_sm


@cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


@cache
def max_parts(heads: int, tiles: int, programs: int) -> int:
    """The most partials any head is split into."""
    total = heads * tiles
    return max(len(head_parts(h, tiles, total, programs)) for h in range(heads))


def lean_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    programs: int | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
    stored_frame: bool = False,
):
    """Decode attention with the Lean schedule; returns (output in q's dtype, lse fp32). `scales`: those of k, v
    stored in one byte ([B, Hkv, S] each), applied inside the kernel. `stored_frame`: k, v are stored rotated
    (attention/quant.py) and q and the output are not: the kernel rotates the queries as it loads them and its outputs
    as it stores them, which in a decode step saves two small launches per layer.

    A program holds at most MAX_ROWS query rows (GQA group x query tokens; fewer where they overflow shared memory):
    more query tokens run in chunks. Raises LeanDoesNotFit where not even one query token's rows fit.
    Runs on CUDA, or anywhere under TRITON_INTERPRET=1 (tests).
    """
    group = q.shape[1] // k.shape[1]
    key = _rows_key(q, k)
    per_chunk = _ROWS.get(key, MAX_ROWS) // group
    if per_chunk < 1:
        raise LeanDoesNotFit(f"{group} query rows of head dim {q.shape[-1]} in {q.dtype} overflow shared memory")
    if q.shape[2] > per_chunk:
        parts = [
            lean_attend(
                q[:, :, i : i + per_chunk],
                k,
                v,
                PositionMask(mask.q_pos[i : i + per_chunk], mask.kv_pos, mask.window),
                programs,
                scales,
                stored_frame,
            )
            for i in range(0, q.shape[2], per_chunk)
        ]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    config = launch_setting(Hq // Hkv * T, None if scales is None else k.dtype).get()
    heads, tiles = B * Hkv, -(-S // config.block_n)
    if programs is None:
        programs = min(default_programs(q.device, config), -(-heads * tiles // config.min_tiles))
    programs = min(programs, heads * tiles)
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    parts_out = torch.empty(
        programs, max_slots(heads, tiles, programs), Hq // Hkv * T, D, dtype=torch.float32, device=q.device
    )
    parts_lse = torch.empty(parts_out.shape[:3], dtype=torch.float32, device=q.device)
    try:
        parts = (parts_out, parts_lse, programs, max_parts(heads, tiles, programs))
        config = _fitted(q, config, k.element_size())
        _triton().run(q, k, v, mask, out, lse, *parts, config, scales=scales, rotate=stored_frame)
    except _triton().OutOfResources:
        # Nothing was launched: retry with half the rows per program (chunks of fewer query tokens).
        _ROWS[key] = (_ROWS.get(key, MAX_ROWS) // 2) if q.shape[2] > 1 else 0
        return lean_attend(q, k, v, mask, programs, scales, stored_frame)
    return out, lse


def lean_sparse_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    tiles: Tensor,
    counts: Tensor,
    block: int,
    dense: Tensor | None = None,
    certify: tuple[Tensor, Tensor] | None = None,
    worst: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
):
    """Lean decode over, for each (batch, KV head) h, the blocks (of `block` slots) tiles[h, :counts[h]]
    (tiles [B * Hkv, blocks] int32, counts [B * Hkv] int32): those tiles laid end to end and cut into equal shares
    as a dense cache's are; a head with dense[h] > 0 (int32) walks all its blocks in order instead (counts[h] = blocks,
    its list unread). Fixed-size buffers and no host sync (the number of tiles stays on the device), so a
    captured CUDA graph replays it for any selection. Returns (output in q's dtype, lse fp32), and with `certify` =
    (L [B * Hkv, rows], unread [B * Hkv]) also HSR's certificate exp(L - lse) * unread per query row (0 where
    unread is 0; rows are a KV head's query heads x tokens, padded), written by the combine, which also raises
    `worst` (a float64 [1] seen as int64, non-negative: its bits order as its values) to the largest. A head with no tiles
    gets output 0 and lse -inf. `scales`: those of k, v stored in one byte. Runs on CUDA, or under TRITON_INTERPRET=1
    (tests)."""
    group = q.shape[1] // k.shape[1]
    key = _rows_key(q, k)
    per_chunk = _ROWS.get(key, MAX_ROWS) // group
    if per_chunk < 1:
        raise LeanDoesNotFit(f"{group} query rows of head dim {q.shape[-1]} in {q.dtype} overflow shared memory")
    B, Hq, T, D = q.shape
    if T > per_chunk:
        parts = [
            lean_sparse_attend(
                q[:, :, i : i + per_chunk],
                k,
                v,
                PositionMask(mask.q_pos[i : i + per_chunk], mask.kv_pos, mask.window),
                tiles,
                counts,
                block,
                dense,
                scales=scales,
            )
            for i in range(0, T, per_chunk)
        ]
        out, lse = torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)
        if certify is None:
            return out, lse
        L, unread = (x.view(B, -1, *x.shape[1:]) for x in certify)
        gap = L[..., : group * T].view(B, -1, group, T) - lse.view(B, -1, group, T)
        unread = unread[..., None, None]
        cert = torch.where(unread > 0, gap.exp() * unread, 0.0).view_as(lse)
        if worst is not None:
            top = worst.view(torch.float64)
            torch.maximum(top, cert.max(), out=top)
        return out, lse, cert
    heads, nb = tiles.shape
    config = replace(CONFIG.get(), block_n=block)
    programs = min(default_programs(q.device), -(-heads * nb // config.min_tiles))
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    # partials by (head, its n-th program): a head's units may span every program
    parts_out = torch.empty(heads, programs, group * T, D, dtype=torch.float32, device=q.device)
    parts_lse = torch.empty(parts_out.shape[:3], dtype=torch.float32, device=q.device)
    cert = torch.empty_like(lse) if certify is not None else None
    try:
        tile_list = (tiles, counts, torch.empty_like(counts), dense)
        certified = None if certify is None else (*certify, cert)
        parts = (parts_out, parts_lse, programs, programs)
        config = _fitted(q, config, k.element_size())
        _triton().run(q, k, v, mask, out, lse, *parts, config, tile_list, certified, worst, scales=scales)
    except _triton().OutOfResources:
        _ROWS[key] = (_ROWS.get(key, MAX_ROWS) // 2) if T > 1 else 0
        return lean_sparse_attend(q, k, v, mask, tiles, counts, block, dense, certify, worst, scales)
    return (out, lse) if certify is None else (out, lse, cert)
