"""What a strategy is, and `global`, the exact single-rank reference.

A strategy decides, for each forward pass on its rank, which of the new tokens the KV cache keeps and what the
queries attend to. The model calls `begin` once per forward pass (masks are built there, once for all layers) and
`attend` in every layer. Long prompts run in two phases, driven by `models.generate`:

* phase 1, "context": each rank feeds the context tokens `context_indices` names (its shard) and keeps their KV,
  `chunk` tokens per forward pass (`context_passes`), so that its activations are bounded by the chunk and not the
  context; a pass attends to what the cache holds so far;
* phase 2, "query": the query and generated tokens go to every rank; each attends to its local KV and the
  partials are merged; the new tokens' KV is kept on the last rank. How phase 2 reads a rank's cache is the
  strategy's decode method (attention/decode.py).

On one rank with `global` both phases are plain causal attention over the cache.

A strategy also answers every question the rest of the project has about it: its options (`Params`, the
`attention.params` of its conf/attention/NAME.yaml), whether a run can use it (`check`), how it is built from a
config (`from_config`), what phase 1 costs (`phase1_tokens`, `attended_pairs`) and holds (`phase1_memory`), and how
it describes itself (`describe`, `record`). Each class registers itself under its `name` when it is defined; a name
not yet registered is looked for in attention/NAME.py, then in every module of attention/ (attention/registry.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention.cache import KVCache, LayerKV, Summarize
from longctx.attention.decode import DecodeMethod, DenseDecode
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from longctx.attention.registry import lookup
from longctx.conf.schema import schema_of

PHASES = ("context", "query")
STRATEGIES: dict[str, type[AttentionStrategy]] = {}
# Context tokens a rank feeds per phase-1 pass where `chunk` is left unset (BENCHMARKS.md, figure
# `chunked-h100-80gb-hbm3`).
AUTO_CHUNK = 65536


@dataclass
class Step:
    """What one forward pass does on this rank; shared by all layers."""

    phase: str
    masks: dict  # window -> PositionMask (ring context: one per ring step; star: over the cache, the anchor's)
    slots: Tensor | None = None  # cache slots of the tokens this rank keeps
    skip: int = 0  # leading new tokens this rank computes but does not keep (a recomputed anchor)


@dataclass
class NoOptions:
    """A strategy (or a config node) without options of its own."""


@dataclass
class Phase1Memory:
    """What one layer of a rank's phase 1 holds for the strategy beyond the model's own tensors (the memory plan)."""

    keys: int | None = None  # keys a pass's attention call reads (None: the context the rank's cache keeps)
    buffers: int = 0  # bytes of the strategy's own buffers during the layer's attention
    merging: int = 0  # bytes of the temporaries of merging a partial into them
    keys_seen: int | None = None  # the most keys of earlier blocks and its own a query sees (None: all)
    one_piece: bool = False  # the mask is one causal square, which a fused kernel runs without merging


def attended_pairs(n: int, window: int | None, block: int | None = None, anchor: int = 0) -> int:
    """(query, key) pairs causal attention over n tokens attends: each query sees the keys of its own block (all
    tokens without `block`) and, past the first block, the anchor's `anchor` tokens, at most `window` back."""
    p = torch.arange(n, dtype=torch.int64)
    start = p - p % block if block else torch.zeros_like(p)
    lo = (p - window + 1).clamp_min(0) if window is not None else torch.zeros_like(p)
    own = p - torch.maximum(start, lo) + 1
    seen_anchor = torch.where(start > 0, (min(anchor, n) - lo).clamp_min(0), 0)
    return int(own.sum() + seen_anchor.sum())


class AttentionStrategy:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoOptions  # the dataclass of `attention.params`
    NodeOptions: ClassVar[type] = NoOptions  # the dataclass of the `attention` node's other keys
    # where a strategy runs on one host only: the strategy to suggest when more hosts would make a run fit
    across_hosts: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get(
            "name"
        ):  # (a subclass that keeps its parent's name, e.g. to record calls, is no new strategy)
            STRATEGIES[cls.name] = cls

    # How the KV cache stores keys and values (None: in the model's dtype), and the context tokens a rank feeds per
    # phase-1 pass (None: AUTO_CHUNK, where the strategy can cut its tokens): set by `attention.from_config`.
    kv_dtype: torch.dtype | None = None
    chunk: int | None = None

    def __init__(self, group: dist.ProcessGroup | None = None, decode: DecodeMethod | None = None):
        self.decode = decode if decode is not None else DenseDecode()
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.world = dist.get_world_size(group) if distributed else 1
        self.phase = "context"

    # --- built from a config, checked against a run
    @classmethod
    def params_schema(cls) -> type:
        """The dataclass of `attention.params`: `Params` where the strategy declares it, else one made from its
        constructor's parameters."""
        return cls.Params if cls.Params is not NoOptions else schema_of(cls, exclude=("group", "decode"))

    @classmethod
    def from_config(
        cls,
        node: Mapping,
        n_ctx: int,
        world: int,
        group: dist.ProcessGroup | None = None,
        decode: DecodeMethod | None = None,
    ) -> AttentionStrategy:
        """The strategy an `attention` config node describes, for a context of `n_ctx` tokens over `world` ranks."""
        return cls(group=group, decode=decode, **cls.resolve_params(node, n_ctx, world))

    @classmethod
    def resolve_params(cls, node: Mapping, n_ctx: int, world: int) -> dict:
        """The constructor's parameters from a config node's `params` (where a null stands for a rule of the
        strategy's, the rule's value for this context and rank count)."""
        return dict(node.get("params") or {})

    @classmethod
    def check(cls, node: Mapping, n_ctx: int, what: str, nproc: int, tp: int) -> None:
        """A ValueError naming the option and the fix if the strategy cannot run a context of `n_ctx` tokens (`what`
        says where that length comes from) on `nproc` ranks in hosts of `tp`."""

    def at(self, rank: int, world: int) -> AttentionStrategy:
        """A copy of this strategy as rank `rank` of `world` holds it: to plan a run without starting its ranks."""
        placed = copy.copy(self)
        placed.rank, placed.world = rank, world
        return placed

    # --- the layout of the context over ranks
    def context_indices(self, n_ctx: int) -> Tensor:
        """Indices (= positions) of the context tokens this rank feeds in phase 1."""
        return torch.arange(n_ctx)

    def fed_tokens(self, n_ctx: int) -> int:
        """How many tokens this rank feeds in phase 1: `len(context_indices(n_ctx))`, counted without them (a plan
        of a context of any length holds no tensor of its length)."""
        return n_ctx

    def pass_tokens(self, n_ctx: int) -> int:
        """The most context tokens this rank feeds in one phase-1 pass."""
        return min(self.fed_tokens(n_ctx), self.chunk or AUTO_CHUNK)

    def context_passes(self, n_ctx: int) -> list[Tensor | None]:
        """The context indices this rank feeds in each phase-1 pass, in order; None: a pass in which it feeds
        nothing but takes part in the others' collectives (`idle_pass`). Every rank of a strategy that communicates
        in phase 1 makes as many passes."""
        idx, size = self.context_indices(n_ctx), self.pass_tokens(n_ctx)
        return [idx[i : i + size] for i in range(0, len(idx), size)]

    def idle_pass(self, cache: KVCache) -> None:
        """This rank's part of the others' collectives in a pass where it feeds nothing (`context_passes`)."""

    def kept_context(self, n_ctx: int) -> int:
        """How many context tokens this rank's KV cache keeps."""
        return self.fed_tokens(n_ctx)

    @property
    def keeps_new_tokens(self) -> bool:
        """Whether this rank keeps the KV of query and generated tokens."""
        return self.rank == self.world - 1

    def cache_slots(self, n_ctx: int, n_after: int) -> int:
        return self.kept_context(n_ctx) + (n_after if self.keeps_new_tokens else 0)

    @property
    def summarize(self) -> Summarize | None:
        """What the KV cache must keep per block of slots for this strategy's decode method (None: nothing)."""
        return self.decode.summarize

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")
        self.phase = phase
        if phase == "context":
            self.decode.reset()

    def decode_report(self) -> dict | None:
        """What the decode method did over the last phase 2, over all ranks (every rank calls it)."""
        return self.decode.report(self.group, self.world)

    # --- what the rest of the project asks
    def phase1_tokens(self, n_ctx: int) -> int:
        """Tokens phase 1 feeds through the model, over all ranks."""
        return n_ctx

    def attended_pairs(self, n_ctx: int, window: int | None) -> int:
        """(query, key) pairs phase 1 attends in a layer of this window, over all ranks."""
        return attended_pairs(n_ctx, window)

    def phase1_memory(
        self, n_ctx: int, tokens: int, heads: int, kv_heads: int, head_dim: int, itemsize: int
    ) -> Phase1Memory:
        """What a phase-1 layer of this rank holds for the strategy, feeding `tokens` (a pass's) of a context of
        `n_ctx`."""
        return Phase1Memory()

    def describe(self, n_ctx: int, where: str) -> str | None:
        """One line on how the context is laid out over `where` (the ranks), said once per layout; None: nothing."""
        return None

    def record(self) -> dict:
        """The strategy's options, as a results row records them."""
        return {}

    # --- per forward pass
    def begin(self, cache: KVCache | None, positions: Tensor, windows: set[int | None]) -> Step:
        if self.phase == "query":
            if cache is None:
                raise ValueError("phase 2 (query) attends to the KV cache: call model.setup_cache first")
            slots = cache.reserve(positions) if self.keeps_new_tokens else None
            return Step("query", {w: PositionMask(positions, cache.positions, w) for w in windows}, slots)
        return self.begin_context(cache, positions, windows)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None, step: Step, window: int | None) -> Tensor:
        if step.phase == "query":
            if step.slots is not None:
                kv.write(step.slots, k, v)
            return self.decode.attend(q, kv, step.masks[window], self.group, self.world)
        return self.attend_context(q, k, v, kv, step, window)

    # --- phase 1, what each strategy defines
    def begin_context(self, cache: KVCache | None, positions: Tensor, windows: set[int | None]) -> Step:
        raise NotImplementedError

    def attend_context(
        self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None, step: Step, window: int | None
    ) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _starts_empty(cache: KVCache | None, name: str) -> None:
        if cache is not None and cache.used:
            raise ValueError(f"{name} phase 1 starts from an empty KV cache; call model.cache.reset() first")


def strategy_class(name: str) -> type[AttentionStrategy]:
    """The strategy registered as `name`, looked for in attention/ if it is not registered yet."""
    return lookup(STRATEGIES, name, "attention")


class GlobalAttention(AttentionStrategy):
    """Exact causal attention on one rank: new tokens are cached and attend to everything cached."""

    name = "global"
    across_hosts = "star"

    @classmethod
    def check(cls, node: Mapping, n_ctx: int, what: str, nproc: int, tp: int) -> None:
        hosts = nproc // tp
        if hosts == 1:
            return
        if tp > 1:
            raise ValueError(
                f"attention=global runs on one host, but parallel.nproc={nproc} with parallel.tp={tp} makes {hosts} "
                f"hosts; use parallel.tp={nproc} (one host), or attention=ring (exact) or attention=star across hosts"
            )
        raise ValueError(
            f"attention=global runs on one rank, but parallel.nproc={nproc}; use attention=ring (exact) or "
            f"attention=star across ranks, or parallel.tp={nproc} (tensor parallel on one host)"
        )

    def phase1_memory(
        self, n_ctx: int, tokens: int, heads: int, kv_heads: int, head_dim: int, itemsize: int
    ) -> Phase1Memory:
        return Phase1Memory(one_piece=tokens >= self.fed_tokens(n_ctx))

    def begin(self, cache: KVCache | None, positions: Tensor, windows: set[int | None]) -> Step:
        # (checked here, not when built: a memory plan builds strategies inside a run of any size, see `at`)
        if self.world > 1:
            raise ValueError(
                f"attention=global runs on one rank, but {self.world} ranks are running; "
                "use attention=ring (exact) or attention=star across ranks"
            )
        slots = cache.reserve(positions) if cache is not None else None
        kv_pos = cache.positions if cache is not None else positions
        return Step(self.phase, {w: PositionMask(positions, kv_pos, w) for w in windows}, slots)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None, step: Step, window: int | None) -> Tensor:
        if kv is None:
            return attend(q, k, v, step.masks[window])
        kv.write(step.slots, k, v)
        if self.phase == "query":
            return self.decode.attend(q, kv, step.masks[window], self.group, 1)
        return attend(q, kv.k, kv.v, step.masks[window], scales=kv.scales)
