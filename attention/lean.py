"""Lean Attention decode: the work over a long KV cache split evenly across all SMs (stream-K).

Decode gives each (batch, KV head) pair a long row of key tiles and almost no queries, so one program per head
leaves most SMs idle and a fixed split per head leaves some idle at the end. Here the B*Hkv*tiles units of work
are laid end to end and cut into one equal share per program, regardless of where heads begin and end. A program
walks its share; each time it finishes a head's stretch it writes a partial (output, lse); the partials of each
head are then combined with the one merge (`attention.merge.merge_partials`).

GQA-aware: a program loads each key/value tile once for all query heads (and query tokens) of its KV head.

`lean_schedule` is the split both paths share. `lean_reference` runs it in PyTorch (CPU, tests); `lean_attend`
runs it as a Triton kernel on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from attention.kernels import PositionMask, dense_attend
from attention.merge import merge_partials

BLOCK_N = 64  # keys per tile
MAX_ROWS = 64  # query rows (query heads per KV head x query tokens) one program holds


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


@cache
def _gather_plan(heads: int, tiles: int, programs: int, device: torch.device) -> tuple[int, Tensor, Tensor, Tensor]:
    """For the reduction: per head, which (program, slot) partials belong to it. Cached per shape."""
    segments = lean_schedule(heads, tiles, programs)
    per_head: list[list[Segment]] = [[] for _ in range(heads)]
    for s in segments:
        per_head[s.head].append(s)
    width = max(len(p) for p in per_head)
    prog = torch.zeros(heads, width, dtype=torch.long)
    slot = torch.zeros(heads, width, dtype=torch.long)
    present = torch.zeros(heads, width, dtype=torch.bool)
    for h, parts in enumerate(per_head):
        for i, s in enumerate(parts):
            prog[h, i], slot[h, i], present[h, i] = s.program, s.slot, True
    slots = max(s.slot for s in segments) + 1
    return slots, prog.to(device), slot.to(device), present.to(device)


def _reduce(parts_out: Tensor, parts_lse: Tensor, plan) -> tuple[Tensor, Tensor]:
    """Merge each head's partials (parts_* indexed [program, slot, ...]) with the one merge; returns [heads, ...]."""
    _, prog, slot, present = plan
    outs = parts_out[prog, slot]  # [heads, width, rows, D]
    lses = parts_lse[prog, slot].masked_fill(~present[..., None], float("-inf"))
    return merge_partials(outs.transpose(0, 1), lses.transpose(0, 1))


def lean_reference(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, programs: int, block_n: int = BLOCK_N):
    """The Lean schedule executed in PyTorch: every segment is attention over its tiles, then the merge."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    tiles = -(-S // block_n)
    plan = _gather_plan(B * Hkv, tiles, programs, q.device)
    parts_out = torch.zeros(programs, plan[0], g * T, D, dtype=torch.float32, device=q.device)
    parts_lse = torch.full((programs, plan[0], g * T), float("-inf"), device=q.device)
    for s in lean_schedule(B * Hkv, tiles, programs):
        b, h = divmod(s.head, Hkv)
        keys = slice(s.tiles[0] * block_n, min(s.tiles[1] * block_n, S))
        part = PositionMask(mask.q_pos, mask.kv_pos[keys], mask.window)
        o, l = dense_attend(q[b : b + 1, h * g : (h + 1) * g], k[b : b + 1, h : h + 1, keys], v[b : b + 1, h : h + 1, keys], part, return_lse=True)
        parts_out[s.program, s.slot] = o[0].reshape(g * T, D).float()
        parts_lse[s.program, s.slot] = l[0].reshape(g * T).float()
    out, lse = _reduce(parts_out, parts_lse, plan)
    return out.view(B, Hkv, g, T, D).reshape(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T)


def supports(q: Tensor, k: Tensor, mask: PositionMask) -> bool:
    """Shapes the Triton kernel takes: a GQA group within MAX_ROWS, power-of-two head dim, no star block mask."""
    group = q.shape[1] // k.shape[1]
    return (
        q.is_cuda and mask.block_size is None and group <= MAX_ROWS and q.shape[-1] in (16, 32, 64, 128, 256)
        and _triton() is not None
    )  # fmt: skip


@cache
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from attention import lean_triton

    return lean_triton


@cache
def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def lean_attend(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, programs: int | None = None):
    """Decode attention on CUDA with the Lean schedule; returns (output in q's dtype, lse fp32).

    A program holds at most MAX_ROWS query rows (GQA group x query tokens): more query tokens run in chunks.
    """
    per_chunk = MAX_ROWS // (q.shape[1] // k.shape[1])
    if q.shape[2] > per_chunk:
        parts = [
            lean_attend(q[:, :, i : i + per_chunk], k, v, PositionMask(mask.q_pos[i : i + per_chunk], mask.kv_pos, mask.window), programs)
            for i in range(0, q.shape[2], per_chunk)
        ]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    tiles = -(-S // BLOCK_N)
    programs = min(programs or _programs(q.device), B * Hkv * tiles)
    plan = _gather_plan(B * Hkv, tiles, programs, q.device)
    parts_out = torch.zeros(programs, plan[0], g * T, D, dtype=torch.float32, device=q.device)
    parts_lse = torch.full((programs, plan[0], g * T), float("-inf"), device=q.device)
    _triton().run(q, k, v, mask, parts_out, parts_lse, programs, BLOCK_N)
    out, lse = _reduce(parts_out, parts_lse, plan)
    return out.view(B, Hkv, g, T, D).reshape(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T)
