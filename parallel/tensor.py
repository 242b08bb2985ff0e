"""Tensor parallelism inside a host, applied to a built Transformer from outside (as gpt-fast's tp.py does).

Each of the `tp` ranks of a host keeps whole heads and a slice of the MLP:

* column-parallel: the fused q/k/v projection (this rank's query heads and their KV heads) and the fused gate/up
  projection (a slice of the intermediate size) keep their rows, still fused per rank;
* row-parallel: `wo` and the down projection keep the matching columns and end in one all-reduce over the host's
  group (`RowParallelLinear`); a bias is added once, after the sum.

Embeddings, norms and the output projection stay whole on every rank. Attention strategies then see only this
rank's heads, and `model.args` becomes the per-rank shape (as gpt-fast rewrites its config), so the KV cache and
the memory plan are sized from it.

Fewer KV heads than ranks (8 KV heads on tp=16, Gemma 3 270M's one on tp=2) are replicated, as transformers' and
vLLM's tensor parallelism do: rank r keeps KV head r // (tp / n_kv_heads), which is the head its query heads use.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.models.config import ModelArgs
from longctx.models.transformer import FusedLinear


def valid_degrees(args: ModelArgs, limit: int = 64) -> list[int]:
    """The tensor-parallel degrees (up to `limit`) that split `args` into whole heads and equal MLP slices."""
    return [d for d in range(1, limit + 1) if _problem(args, d) is None]


def _problem(args: ModelArgs, tp: int) -> str | None:
    if args.n_heads % tp:
        return f"its {args.n_heads} query heads"
    if args.intermediate_size % tp:
        return f"its intermediate size {args.intermediate_size}"
    if args.n_kv_heads % tp and tp % args.n_kv_heads:
        return f"its {args.n_kv_heads} KV heads (neither divisible by {tp} nor dividing it, so they cannot be replicated evenly)"
    return None


def check_degree(args: ModelArgs, tp: int, model_name: str = "the model") -> None:
    """A clear error unless `tp` splits the model; it names the degrees that do."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"parallel.tp must be a positive integer (GPUs per host); got {tp!r}")
    problem = _problem(args, tp)
    if problem:
        raise ValueError(
            f"parallel.tp={tp} does not divide {model_name}: {problem}; "
            f"valid tensor-parallel degrees: {', '.join(map(str, valid_degrees(args)))}"
        )


def local_args(args: ModelArgs, tp: int) -> ModelArgs:
    """The shape one of `tp` ranks holds: its query heads, KV heads (replicated below one per rank) and MLP slice."""
    check_degree(args, tp)
    return dataclasses.replace(
        args,
        n_heads=args.n_heads // tp,
        n_kv_heads=max(1, args.n_kv_heads // tp),
        intermediate_size=args.intermediate_size // tp,
    )


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `tp` in a host's group: which slice of each weight it keeps, and how the model is rewritten."""

    args: ModelArgs  # the whole model's shape
    tp: int
    rank: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        check_degree(self.args, self.tp)
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside 0..{self.tp - 1}")

    @property
    def local(self) -> ModelArgs:
        return local_args(self.args, self.tp)

    def _heads(self) -> tuple[slice, slice]:
        """Rows of this rank's query heads and of its KV heads, in units of head_dim."""
        a, loc = self.args, self.local
        q = slice(self.rank * loc.n_heads, (self.rank + 1) * loc.n_heads)
        kv_first = self.rank * a.n_kv_heads // self.tp  # = rank // (tp / n_kv) when KV heads are replicated
        return q, slice(kv_first, kv_first + loc.n_kv_heads)

    def index(self, name: str, part: int | None) -> tuple[slice, ...]:
        """Where this rank's slice lies in the whole tensor `name` (our parameter name; `part` of a fused one):
        an index into the checkpoint tensor, so that a loader reads only it. () means the whole tensor."""
        module, _, kind = name.rpartition(".")
        hd, inter = self.args.head_dim, self.local.intermediate_size
        q, kv = self._heads()
        rows = lambda s, unit: slice(s.start * unit, s.stop * unit)  # noqa: E731
        if module.endswith("attention.wqkv"):
            return (rows(q if part == 0 else kv, hd),)
        if module.endswith("attention.wo") and kind == "weight":
            return (slice(None), rows(q, hd))
        if module.endswith("feed_forward.w13"):
            return (slice(self.rank * inter, (self.rank + 1) * inter),)
        if module.endswith("feed_forward.w2") and kind == "weight":
            return (slice(None), slice(self.rank * inter, (self.rank + 1) * inter))
        return ()

    def take(self, name: str, whole: Tensor, splits: tuple[int, ...] | None = None) -> Tensor:
        """This rank's slice of a whole parameter, as a tensor of its own storage (a view would keep the whole one
        alive); a fused one (`splits`: its parts' rows) slices each part."""
        if not splits:
            return whole[self.index(name, None)].clone(memory_format=torch.contiguous_format)
        parts = whole.split(splits, dim=0)
        return torch.cat([p[self.index(name, i)] for i, p in enumerate(parts)], dim=0)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Rewrite a Transformer (on the meta device or with weights) in place to hold only this rank's slices."""
        if self.tp == 1:
            return model
        loc = self.local
        for i, layer in enumerate(model.layers):
            attn, ff = layer.attention, layer.feed_forward
            attn.n_heads, attn.n_kv_heads = loc.n_heads, loc.n_kv_heads
            q_rows, kv_rows = loc.n_heads * loc.head_dim, loc.n_kv_heads * loc.head_dim
            attn.wqkv = self._fused(f"layers.{i}.attention.wqkv", attn.wqkv, (q_rows, kv_rows, kv_rows))
            attn.wo = self._row_parallel(f"layers.{i}.attention.wo", attn.wo)
            ff.w13 = self._fused(f"layers.{i}.feed_forward.w13", ff.w13, (loc.intermediate_size,) * 2)
            ff.w2 = self._row_parallel(f"layers.{i}.feed_forward.w2", ff.w2)
        model.args = loc
        return model

    def _fused(self, name: str, whole: FusedLinear, splits: tuple[int, ...]) -> FusedLinear:
        with torch.device("meta"):
            local = FusedLinear(whole.in_features, splits, bias=whole.bias is not None)
        local.weight = _param(self.take(f"{name}.weight", whole.weight, whole.splits))
        local.bias = None if whole.bias is None else _param(self.take(f"{name}.bias", whole.bias, whole.splits))
        return local

    def _row_parallel(self, name: str, whole: nn.Linear) -> nn.Module:
        weight = self.take(f"{name}.weight", whole.weight)
        return RowParallelLinear(_param(weight), None if whole.bias is None else _param(whole.bias), self.group)


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class RowParallelLinear(nn.Module):
    """x @ Wᵀ over this rank's input columns, summed over the group, then the bias (once)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias
