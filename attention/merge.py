"""The one merge every split of attention uses: combine partial results (output, log-sum-exp) exactly.

If a query's keys are split into parts, each part's softmax attention gives an output o_i and a log-sum-exp l_i of
its scores. The attention over all keys is  sum_i o_i * exp(l_i - L)  with  L = log(sum_i exp(l_i)).
Computed with the largest l_i subtracted first (no overflow), in fp32, and with parts that saw no key (l_i = -inf)
contributing nothing; a query that saw no key in any part gets output 0 and L = -inf.

Ring steps, star phase 2, split-KV decode and multi-rank decode all call `merge_partials`.
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def merge_partials(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge N partials stacked on dim 0: outs [N, ..., D], lses [N, ...] -> (out [..., D] fp32, lse [...] fp32)."""
    lses = lses.float()
    top = lses.amax(dim=0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # all parts empty: avoid inf - inf
    weights = torch.exp(lses - top)  # [N, ...]; 0 for empty parts
    total = weights.sum(dim=0)
    out = (outs.float() * weights.unsqueeze(-1)).sum(dim=0) / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(
        -1
    )
    return out, top + torch.log(total)


def merge_pair(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two partials merged (`merge_partials`), in out_a's dtype: on CUDA one compiled pass, the stacks never made."""
    return (_compiled_merge_two() if out_a.is_cuda else _merge_two)(out_a, lse_a, out_b, lse_b)


def _merge_two(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = merge_partials(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    return out.to(out_a.dtype), lse


@cache
def _compiled_merge_two() -> Callable:
    return torch.compile(_merge_two, dynamic=True)


MERGE_CHUNK_ELEMENTS = 1 << 25


def merge_into(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor, elements: int = MERGE_CHUNK_ELEMENTS) -> None:
    """Merge partial b into the running (out fp32, lse fp32) in place: the form ring steps use as shards arrive.

    A chunk of query rows at a time (about `elements` output values): at 512K queries per rank the whole-tensor
    merge would hold several copies of an 8 GiB fp32 output at once.
    """
    rows = max(1, elements // max(1, out[..., 0, :].numel()))
    for i in range(0, out.shape[-2], rows):
        r = slice(i, i + rows)
        outs = torch.stack([out[..., r, :], out_b[..., r, :].float()])
        out[..., r, :], lse[..., r] = merge_partials(outs, torch.stack([lse[..., r], lse_b[..., r].float()]))


def all_gather_merge(out: Tensor, lse: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Merge this rank's partial with every other rank's: one all-gather of output and lse packed together."""
    packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts)
    return merge_partials(stacked[..., :-1], stacked[..., -1])
