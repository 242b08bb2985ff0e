"""How phase 2 (the query and every generated token) reads each rank's KV cache: a decode method, the `decode` group.

A strategy is built with one (`AttentionStrategy(decode=...)`) and hands it every phase-2 attention call: the
queries, this rank's part of the cache for the layer, the mask, and the group of ranks whose partials it merges.
`DenseDecode` reads every slot; `attention.hsr.HSRDecode` reads only the key blocks its certificate needs;
`attention.window.WindowDecode` only the first and the latest tokens. A method is a dataclass of its options (the
keys of conf/decode/NAME.yaml besides `name`), registered under its `name` when its class is defined; a method
named NAME not yet registered is looked for in attention/ (attention/registry.py).

A method may keep a summary of every block of cache slots (`summarize`, given to the cache), state across steps and
statistics over a phase 2 (`report`); the memory plan asks it for its extra bytes (`cache_bytes`, `workspace_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor

from longctx.attention.cache import LayerKV, Summarize
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from longctx.attention.merge import all_gather_merge
from longctx.attention.registry import lookup
from longctx.conf.schema import check_fields

DECODE_METHODS: dict[str, type[DecodeMethod]] = {}


@dataclass
class DecodeMethod:
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # (a subclass that keeps its parent's name is no new method)
            DECODE_METHODS[cls.name] = cls

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def summarize(self) -> Summarize | None:
        """What the KV cache keeps per block of slots for this method (None: nothing)."""
        return None

    def attend(self, q: Tensor, kv: LayerKV, mask: PositionMask, group: dist.ProcessGroup | None, world: int) -> Tensor:
        """Attention of q [B, Hq, T, D] over this rank's cache of the layer, merged with the other `world - 1`
        ranks' of `group`; in q's dtype."""
        raise NotImplementedError

    def reset(self) -> None:
        """A new phase 1 begins: forget what the last phase 2 counted."""

    def report(self, group: dist.ProcessGroup | None, world: int) -> dict | None:
        """What the last phase 2 did, summed over the ranks (every rank calls it); None: nothing to say."""
        return None

    def describe(self, report: dict) -> str:
        """One line for a `report`."""
        return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items())

    def check_context(self, n_ctx: int, what: str) -> None:
        """A ValueError if this method cannot read a context of `n_ctx` tokens (`what` names the option that length
        comes from, e.g. ctx.length)."""

    def cache_bytes(self, slots: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Bytes a layer's cache of `slots` slots holds beyond keys, values and positions (the summaries)."""
        return 0

    def workspace_bytes(
        self, heads: int, kv_heads: int, head_dim: int, queries: int, slots: int, itemsize: int
    ) -> int | None:
        """Bytes this method's CPU path holds beyond its inputs for `queries` queries over `slots` slots; None: the
        dense kernel's (the memory plan counts those)."""
        return None

    def options(self) -> dict:
        """The method's name and options, as a results row records them."""
        return {"name": self.name} | {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@dataclass
class DenseDecode(DecodeMethod):
    """Every slot of every rank's cache, exactly: each rank's (output, lse) over its slots, merged across ranks."""

    name: ClassVar[str] = "dense"

    def attend(self, q: Tensor, kv: LayerKV, mask: PositionMask, group: dist.ProcessGroup | None, world: int) -> Tensor:
        if world == 1:
            return attend(q, kv.k, kv.v, mask, scales=kv.scales).to(q.dtype)
        out, lse = attend(q, kv.k, kv.v, mask, return_lse=True, scales=kv.scales)
        return all_gather_merge(out, lse, group)[0].to(q.dtype)


def decode_class(name: str) -> type[DecodeMethod]:
    """The method registered as `name`, looked for in attention/ if it is not registered yet."""
    return lookup(DECODE_METHODS, name, "decode")


def build_decode(options: Any) -> DecodeMethod:
    """The method a `decode` config node (or a mapping: `name` and the method's options) describes."""
    options = dict(options or {"name": "dense"})
    return decode_class(options.pop("name", "dense"))(**options)
