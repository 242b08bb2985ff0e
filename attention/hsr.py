"""HSR-style certified sparse decode attention: read only the key blocks whose score can matter, and bound the rest.

For every block of `block` key slots the cache keeps a summary: the per-channel minimum and maximum key, how many
slots are filled, and the lowest and highest position held. For a query q the largest score any key of block b can
have is at most

    u_b = sum_i max(q_i * min_bi, q_i * max_bi) / sqrt(D)          (each term bounds q_i * k_i for min <= k_i <= max)

A step always reads the sink blocks (the first `sink` tokens) and the blocks holding the `recent` latest tokens, then
the other blocks in decreasing order of u_b, in rounds of doubling size, until the certificate

    c = sum over unread visible blocks b of n_b * exp(u_b - lse_read)

is at most `eps` for every query head. Since each unread key j has s_j <= u_b, the unread softmax mass Z_skip and the
read mass Z_read = exp(lse_read) satisfy rho = Z_skip / Z_read <= c. The output is exact attention over the read keys,
o_read; the true output is o = (o_read + rho * o_skip) / (1 + rho), so for every value channel i

    |o_i - o_read_i| <= c / (1 + c) * (max_j v_ji - min_j v_ji)       (the values' range over visible keys)
    0 <= lse_true - lse_read <= log(1 + c)

Across ranks: each rank returns (o_read, lse_read, c) over its own keys; the (output, lse) merge of the read parts is
exact attention over the union of the read keys, and the union's ratio is sum_r rho_r Z_r / sum_r Z_r, at most the
read-mass-weighted mean of the ranks' certificates (`merge_certificates`). The same two inequalities then hold for
the merged output with that certificate. tests/test_hsr.py checks both against float64 attention.

This is the PyTorch reference (CPU, and the specification for the CUDA kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attention.kernels import PositionMask


@dataclass
class KeySummary:
    """Per block of `block` slots: per-channel key minimum and maximum [B, Hkv, blocks, D], filled slots [blocks],
    lowest and highest position held [blocks] (empty blocks hold +inf/-inf keys and count 0)."""

    block: int
    kmin: Tensor
    kmax: Tensor
    count: Tensor
    pmin: Tensor
    pmax: Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, block: int, device=None, dtype=torch.float32) -> "KeySummary":
        """A summary of an empty cache; `dtype` holds the keys exactly (fp32 for bf16/fp16/fp32 caches)."""
        check_block(block)
        n = -(-slots // block)
        inf = torch.full((batch, kv_heads, n, head_dim), math.inf, device=device, dtype=dtype)
        big = torch.iinfo(torch.long).max
        return cls(block, inf.clone(), -inf, torch.zeros(n, dtype=torch.long, device=device),
                   torch.full((n,), big, dtype=torch.long, device=device), torch.full((n,), -1, dtype=torch.long, device=device))  # fmt: skip

    def reset(self) -> None:
        """Back to the summary of an empty cache."""
        self.kmin.fill_(math.inf)
        self.kmax.fill_(-math.inf)
        self.count.zero_()
        self.pmin.fill_(torch.iinfo(torch.long).max)
        self.pmax.fill_(-1)

    @classmethod
    def of(cls, k: Tensor, kv_pos: Tensor, block: int) -> "KeySummary":
        """The summary of a whole cache k [B, Hkv, S, D] whose slot positions are kv_pos [S] (-1: empty)."""
        s = cls.empty(*k.shape[:3], k.shape[3], block, k.device, torch.promote_types(k.dtype, torch.float32))
        s.update(torch.arange(k.shape[2], device=k.device)[kv_pos >= 0], k[:, :, kv_pos >= 0], kv_pos[kv_pos >= 0])
        return s

    def update(self, slots: Tensor, k: Tensor, positions: Tensor) -> None:
        """Fold newly written keys k [B, Hkv, n, D] at `slots` [n] (holding `positions`) into their blocks."""
        b = slots // self.block
        kf = k.to(self.kmin.dtype)
        idx = b[None, None, :, None].expand_as(kf)
        self.kmin.scatter_reduce_(2, idx, kf, "amin")
        self.kmax.scatter_reduce_(2, idx, kf, "amax")
        self.count.index_add_(0, b, torch.ones_like(b))
        self.pmin.scatter_reduce_(0, b, positions, "amin")
        self.pmax.scatter_reduce_(0, b, positions, "amax")


def check_block(block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"hsr_block must be a power of two; got {block}")


def check_eps(eps: float) -> None:
    if not 0 < eps < 1:
        raise ValueError(f"hsr_eps bounds the unread share of the softmax mass: it must be in (0, 1); got {eps}")


def score_bounds(q: Tensor, summary: KeySummary) -> Tensor:
    """u [B, Hq, T, blocks]: no key of a block scores above it for that query (scores scaled by D**-0.5)."""
    B, Hq, T, D = q.shape
    g = Hq // summary.kmin.shape[1]
    qf = q.to(summary.kmin.dtype).reshape(B, -1, g * T, 1, D)  # [B, Hkv, g*T, 1, D]
    lo, hi = summary.kmin[:, :, None], summary.kmax[:, :, None]  # [B, Hkv, 1, blocks, D]
    # inf - inf is nan in an empty block: its bound is -inf (it holds nothing)
    u = torch.maximum(qf * lo, qf * hi).nan_to_num(nan=-math.inf).sum(-1) * D**-0.5
    u = u.masked_fill((summary.count == 0)[None, None, None, :], -math.inf)
    return u.view(B, Hq, T, -1)


@dataclass
class HSRResult:
    out: Tensor  # [B, Hq, T, D], exact attention over the read keys
    lse: Tensor  # [B, Hq, T], fp32 (float64 for float64 inputs), of the read keys
    certificate: Tensor  # [B, Hq, T]: unread softmax mass / read mass is at most this
    blocks_read: Tensor  # [B, Hkv] blocks read per KV head
    blocks_visible: int


def hsr_attend(
    q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, summary: KeySummary, eps: float, sink: int = 64, recent: int = 256
) -> HSRResult:
    """Decode attention of q [B, Hq, T, D] (T small) over the cache k, v [B, Hkv, S, D] reading only the blocks
    needed for the certificate to be at most `eps` for every query (module docstring). One KV head's selection
    serves all its query heads, as a kernel would read it."""
    check_eps(eps)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g, nb = Hq // Hkv, summary.count.numel()
    first = int(mask.q_pos.min())
    last = int(mask.q_pos.max())
    # blocks a query can see at all: filled, not entirely in the future, not entirely before the window
    visible = (summary.count > 0) & (summary.pmin <= last)
    if mask.window is not None:
        visible &= summary.pmax > first - mask.window
    always = visible & ((summary.pmin < sink) | (summary.pmax > last - recent))
    u = score_bounds(q, summary).masked_fill(~visible, -math.inf)  # [B, Hq, T, nb]
    group_u = u.view(B, Hkv, g * T, nb).amax(2)  # a block's best bound over its group's queries
    order = group_u.masked_fill(always[None, None], math.inf).argsort(-1, descending=True)  # [B, Hkv, nb]
    n_visible = int(visible.sum())
    take = max(int(always.sum()), 1)
    while True:
        chosen = torch.zeros(B, Hkv, nb, dtype=torch.bool, device=q.device)
        chosen.scatter_(2, order[..., :take], True)
        chosen &= visible
        out, lse = _attend_blocks(q, k, v, mask, chosen, summary.block)
        unread = (~chosen & visible)[:, :, None].expand(B, Hkv, g * T, nb).reshape(B, Hq, T, nb)
        mass = summary.count.to(u.dtype) * torch.exp(u - lse[..., None]).nan_to_num(nan=0.0)
        cert = torch.where(unread, mass, 0.0).sum(-1)
        if take >= n_visible or bool((cert <= eps).all()):
            return HSRResult(out, lse, cert, chosen.sum(-1), n_visible)
        take = min(2 * take, nb)


def _attend_blocks(q: Tensor, k: Tensor, v: Tensor, mask: PositionMask, chosen: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Exact attention over the visible keys of the chosen blocks (per KV head): fp32 (float64 for float64 inputs)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    keep = chosen[..., torch.arange(k.shape[2], device=k.device) // block]  # [B, Hkv, S]
    allowed = mask.dense()[None, None, None] & keep[:, :, None, None, :]  # [B, Hkv, 1, T, S]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).reshape(B, Hkv, g, T, D) * D**-0.5
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, k.to(acc)).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(lse.isinf().unsqueeze(-1), 0.0))
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, v.to(acc))
    return out.reshape(B, Hq, T, D).to(q.dtype), lse.reshape(B, Hq, T)


def merge_certificates(lses: Tensor, certificates: Tensor) -> Tensor:
    """The certificate of merged partials [parts, ...]: their read-mass-weighted mean (module docstring)."""
    weights = torch.softmax(lses.float(), dim=0).nan_to_num(nan=0.0)
    return (weights * certificates).sum(0)


def error_bound(certificate: Tensor, v_range: Tensor) -> Tensor:
    """The largest |o - o_read| per channel that a certificate allows, given the values' range per channel."""
    return (certificate / (1 + certificate))[..., None] * v_range
