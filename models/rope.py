"""Rotary position embeddings with every scaling the supported checkpoints ship, each as transformers defines it.

`read_scaling` turns a config.json's rope block (the old `rope_scaling` with `type`, or transformers 5's
`rope_parameters` with `rope_type`) into one checked dict with everything the frequencies need; `Rotary` gives the
cos/sin of positions from it.

Two scalings depend on how long the sequence is: dynamic NTK raises its base past the trained positions, LongRoPE
switches from short to long factors past the original context. transformers takes that length from the last
position of each forward call. Here the caller may name it (`span`): a prompt fed in pieces (ring shards, star
blocks, context then query) is rotated as one call over the whole prompt is, so every strategy sees the frequencies
global attention sees, and each decode step those of its own length, as in transformers' call sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from longctx.conf.schema import check_value

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# Types whose frequencies depend on the sequence's length (see the module's docstring).
LENGTH_DEPENDENT = ("dynamic", "longrope")

_POSITIVE = {"low": 0, "low_open": True}
# What each type needs besides its name (all positive numbers), and what it may have.
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings",),
}
_OPTIONAL = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
    "longrope": ("factor", "attention_factor"),
}
# Types whose original context transformers fills in from the config when the block leaves it out.
_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def read_scaling(
    block: dict[str, Any],
    where: str,
    cfg: dict[str, Any],
    rotary_dim: int,
    aliases: dict[str, str] | None = None,
    family: tuple[str, tuple[str, ...]] | None = None,
) -> dict[str, Any] | None:
    """The checked scaling of a rope block (None: plain rope), with the values transformers derives from the rest
    of the config filled in: the original context, LongRoPE's and YaRN's attention factor, dynamic NTK's reference
    length. `where` names the block in errors (`rope_scaling`); `cfg` is the whole config.json; `aliases` maps a
    family's old type names to ours (Phi-3's `su`); `family`: (architecture, the only types it takes)."""
    scaling = {k: v for k, v in block.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"  # the new spelling wins, as in transformers
    scaling.pop("type", None)
    kind = (aliases or {}).get(kind, kind)
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if family is not None and kind not in family[1]:
        raise ValueError(f"{where}: {family[0]} takes rope types {', '.join(family[1])}; got {kind!r}")
    scaling["rope_type"] = kind
    if kind == "default":
        return None
    max_pos = cfg.get("max_position_embeddings", 4096)
    if kind in _WITH_ORIGINAL:
        if cfg.get("original_max_position_embeddings") is not None:  # a top-level key wins, as in transformers
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_pos)
    for key in _REQUIRED[kind]:
        if scaling.get(key) is None:
            raise ValueError(f"{where} of type {kind!r} lacks {key}")
    for key in (*_REQUIRED[kind], *_OPTIONAL.get(kind, ())):
        if scaling.get(key) is not None:
            check_value(f"{where}.{key}", scaling[key], float, _POSITIVE)
    if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"{where}.low_freq_factor must be below its high_freq_factor")
    if kind == "yarn":
        _yarn(scaling, where)
    elif kind == "longrope":
        _longrope(scaling, where, max_pos, rotary_dim)
    elif kind == "dynamic":
        scaling["max_position_embeddings"] = max_pos  # transformers scales from the config's, not an original
    return scaling


def _yarn(scaling: dict[str, Any], where: str) -> None:
    check_value(f"{where}.truncate", scaling.setdefault("truncate", True), bool, {})
    if scaling.get("attention_factor") is None:
        factor, mscale, mscale_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
        scaling["attention_factor"] = (
            _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
        )
    scaling["beta_fast"] = scaling.get("beta_fast") or 32
    scaling["beta_slow"] = scaling.get("beta_slow") or 1


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _longrope(scaling: dict[str, Any], where: str, max_pos: int, rotary_dim: int) -> None:
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not isinstance(value, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value
        ):
            raise ValueError(f"{where}.{key} must be a list of positive numbers, one per rotary frequency")
        if len(value) != rotary_dim // 2:
            raise ValueError(
                f"{where}.{key} has {len(value)} entries; heads of {rotary_dim} rotary dims need {rotary_dim // 2}"
            )
    original = scaling["original_max_position_embeddings"]
    if scaling.get("attention_factor") is None:
        factor = scaling.get("factor") or max_pos / original
        scaling["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def context_of(scaling: dict[str, Any] | None, max_pos: int) -> int:
    """Positions a model runs at: its config's, or the context YaRN and dynamic NTK extend it to (original context,
    or the config's positions, times the factor), as serving engines count them."""
    kind = (scaling or {}).get("rope_type")
    if kind == "yarn":
        return max(max_pos, int(scaling["original_max_position_embeddings"] * scaling["factor"]))
    if kind == "dynamic":
        return max(max_pos, int(max_pos * scaling["factor"]))
    return max_pos


def _powers(dim: int, device: torch.device | str | None) -> Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def inv_freq(theta: float, scaling: dict[str, Any] | None, dim: int, device=None) -> Tensor:
    """Inverse frequencies (fp32, dim/2 of them) of a rope with a length-independent scaling, or of a
    length-dependent one at its shortest (dynamic NTK at its reference length, LongRoPE's short factors)."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    plain = 1.0 / (theta ** _powers(dim, device))
    if kind == "linear":
        return plain / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / plain
        scaled = torch.where(wavelen > old_len / low, plain / factor, plain)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(theta, scaling, dim, device)
    if kind == "longrope":
        return 1.0 / (
            torch.tensor(scaling["short_factor"], dtype=torch.float32, device=device) * theta ** _powers(dim, device)
        )
    return plain


def _yarn_inv_freq(theta: float, scaling: dict[str, Any], dim: int, device) -> Tensor:
    """YaRN's blend: high frequencies kept (extrapolated), low ones divided by the factor (interpolated), a linear
    ramp between the dims that turn beta_fast and beta_slow times over the original context."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_turning(turns: float) -> float:
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(scaling["beta_fast"]), dim_turning(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** _powers(dim, device)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


class Rotary(nn.Module):
    """The cos/sin of one rope (fp32): theta, scaling and how many dims of each head it turns (`dim`)."""

    def __init__(self, theta: float, scaling: dict[str, Any] | None, dim: int, device=None):
        super().__init__()
        self.theta, self.scaling, self.dim = theta, scaling or {}, dim
        self.kind = self.scaling.get("rope_type", "default")
        self.attention_factor = float(self.scaling.get("attention_factor", 1.0))
        self.register_buffer("inv_freq", inv_freq(theta, scaling, dim, device), persistent=False)
        if self.kind == "longrope":
            long = torch.tensor(self.scaling["long_factor"], dtype=torch.float32, device=device)
            self.register_buffer("long_inv_freq", 1.0 / (long * theta ** _powers(dim, device)), persistent=False)

    @property
    def length_dependent(self) -> bool:
        return self.kind in LENGTH_DEPENDENT

    def frequencies(self, span: Tensor) -> Tensor:
        """Inverse frequencies for a sequence of `span` tokens (a 0-dim int64 tensor: no host sync)."""
        if self.kind == "longrope":
            return torch.where(
                span > self.scaling["original_max_position_embeddings"], self.long_inv_freq, self.inv_freq
            )
        if self.kind == "dynamic":
            ref, factor = self.scaling["max_position_embeddings"], self.scaling["factor"]
            seq = span.clamp(min=ref)  # (no new tensor from the host: capturable in a CUDA graph)
            base = self.theta * ((factor * seq / ref) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return 1.0 / (base ** _powers(self.dim, span.device))
        return self.inv_freq

    def forward(self, positions: Tensor, span: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [T, dim] (fp32) of `positions` [T] in a sequence of `span` tokens (default: the last position
        + 1); only length-dependent scalings read the span."""
        inv = self.inv_freq
        if self.length_dependent:
            inv = self.frequencies(positions.max() + 1 if span is None else span)
        freqs = positions[:, None].float() * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
