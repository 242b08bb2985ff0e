"""HSR-style certified sparse decode attention: read only the key blocks whose score can matter, and bound the rest.

For every block of `block` key slots the cache keeps a summary: the per-channel minimum and maximum key, how many
slots are filled, and the lowest and highest position held. For a query q the largest score any key of block b can
have is at most

    u_b = sum_i max(q_i * min_bi, q_i * max_bi) / sqrt(D)  =  (q+ . max_b + q- . min_b) / sqrt(D)

(q+ and q- the positive and negative parts of q: each term bounds q_i * k_i for min <= k_i <= max).

A step reads in two passes, with nothing decided on the host (so that it runs inside a CUDA graph):
1. the first read: the sink blocks (the first `sink` tokens), the blocks holding the `recent` latest tokens, and
   each KV head's other block of highest bound. Their exact log-sum-exp L per query is a lower bound on that of any
   selection that contains them.
2. Each other visible block gets the weight w_b = max over the KV head's query rows of n_b * exp(u_b - L), where n_b
   is the block's filled slots. The unread blocks are those below a threshold 2^c, c the largest power of two for
   which the weights below it sum to at most `eps` (the weights binned by their exponent, BINS bins from 2^LOW up:
   a histogram instead of a sort, which costs one pass on a GPU and reads at most the blocks of one bin more than a
   sort would). The rest, and the first read, are read exactly; their (output, lse) is the step's result.

A head whose selection read at least DENSE_SHARE of its visible blocks twice in a row reads all of them, exactly
(certificate 0), for the next PROBE_EVERY - 1 steps, then selects again, and goes straight back if that selection
is spread too: where attention is spread out, the selection costs more than it saves. Twice, because a head whose
queries only now and then spread out would otherwise read everything for the steps after each such query. The
state per (batch, KV head) lives with the key summary (`KeySummary.dense_until`, `next_dense_until`); it decides
what a step costs, never what it returns beyond the certificate. It holds the query position where the run ends,
not a count of steps: a step of that run then writes nothing, so the kernels that read it within a step need no
order among themselves.

The certificate per query row is c = exp(L - lse_read) * (sum of the unread blocks' weights) <= eps. Since each
unread key j has s_j <= u_b, the unread softmax mass Z_skip and the read mass Z_read = exp(lse_read) satisfy
rho = Z_skip / Z_read <= sum_unread n_b exp(u_b - lse_read) <= c. The output is exact attention over the read keys,
o_read; the true output is o = (o_read + rho * o_skip) / (1 + rho), so for every value channel i

    |o_i - o_read_i| <= c / (1 + c) * (max_j v_ji - min_j v_ji)       (the values' range over visible keys)
    0 <= lse_true - lse_read <= log(1 + c)

Across ranks: each rank returns (o_read, lse_read, c) over its own keys; the (output, lse) merge of the read parts is
exact attention over the union of the read keys, and the union's ratio is sum_r rho_r Z_r / sum_r Z_r, at most the
read-mass-weighted mean of the ranks' certificates (`merge_certificates`). The same two inequalities then hold for
the merged output with that certificate. tests/test_hsr.py checks both against float64 attention.

On CUDA the same rule runs as Triton kernels (attention/hsr_triton.py); the final read is the Lean decode kernel
over each head's list of blocks (`attention.lean.lean_sparse_attend`). Elsewhere it runs in PyTorch.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention import lean
from longctx.attention.cache import LayerKV, Summarize
from longctx.attention.decode import DecodeMethod
from longctx.attention.mask import PositionMask
from longctx.attention.merge import all_gather_merge
from longctx.attention.quant import dequantize, from_stored_frame, to_stored_frame, value_rows
from longctx.conf.schema import check_value, option


@dataclass
class KeySummary:
    """Per block of `block` slots: per-channel key minimum and maximum [B, Hkv, blocks, D] in the keys' own dtype
    (the minimum of values of a dtype is one of them), filled slots [blocks], lowest and highest position held
    [blocks] (empty blocks hold +inf/-inf keys and count 0); and per (batch, KV head) `dense_until` [B, Hkv] int32:
    steps whose last query position is below it read every block, or (0, -1, a past position) the spread selections
    just before (`next_dense_until`), and `arrived` [B, Hkv] int32, the CUDA selection's count of its programs done
    within a step (0 between steps)."""

    block: int
    kmin: Tensor
    kmax: Tensor
    count: Tensor
    pmin: Tensor
    pmax: Tensor
    dense_until: Tensor
    arrived: Tensor | None = None  # (zeros like dense_until where not given)

    def __post_init__(self) -> None:
        if self.arrived is None:
            self.arrived = torch.zeros_like(self.dense_until)

    @classmethod
    def empty(
        cls, batch: int, kv_heads: int, slots: int, head_dim: int, block: int, device=None, dtype=torch.float32
    ) -> "KeySummary":
        """A summary of an empty cache of keys of `dtype`."""
        check_block(block)
        n = -(-slots // block)
        inf = torch.full((batch, kv_heads, n, head_dim), math.inf, device=device, dtype=dtype)
        big = torch.iinfo(torch.long).max
        return cls(
            block,
            inf.clone(),
            -inf,
            torch.zeros(n, dtype=torch.long, device=device),
            torch.full((n,), big, dtype=torch.long, device=device),
            torch.full((n,), -1, dtype=torch.long, device=device),
            torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
        )

    def reset(self) -> None:
        """Back to the summary of an empty cache."""
        self.kmin.fill_(math.inf)
        self.kmax.fill_(-math.inf)
        self.count.zero_()
        self.pmin.fill_(torch.iinfo(torch.long).max)
        self.pmax.fill_(-1)
        self.dense_until.zero_()

    @classmethod
    def of(cls, k: Tensor, kv_pos: Tensor, block: int) -> "KeySummary":
        """The summary of a whole cache k [B, Hkv, S, D] whose slot positions are kv_pos [S] (-1: empty)."""
        s = cls.empty(*k.shape[:3], k.shape[3], block, k.device, k.dtype)
        s.update(torch.arange(k.shape[2], device=k.device)[kv_pos >= 0], k[:, :, kv_pos >= 0], kv_pos[kv_pos >= 0])
        return s

    def update(self, slots: Tensor, k: Tensor, positions: Tensor) -> None:
        """Fold newly written keys k [B, Hkv, n, D] at `slots` [n] (holding `positions`) into their blocks: on CUDA,
        a decode step's few keys in one kernel (every decode step of every layer does this), else five scatters."""
        pow2 = k.shape[-1] & (k.shape[-1] - 1) == 0
        if k.is_cuda and slots.numel() <= UPDATE_IN_ONE and pow2 and _triton() is not None:
            _triton().update_summary(self, slots, k, positions)
        else:
            self.scatter(slots, k, positions)

    def scatter(self, slots: Tensor, k: Tensor, positions: Tensor) -> None:
        """`update` with PyTorch's scatters (any number of keys, any device)."""
        b = slots // self.block
        kf = k.to(self.kmin.dtype)
        idx = b[None, None, :, None].expand_as(kf)
        self.kmin.scatter_reduce_(2, idx, kf, "amin")
        self.kmax.scatter_reduce_(2, idx, kf, "amax")
        self.count.index_add_(0, b, torch.ones_like(b))
        self.pmin.scatter_reduce_(0, b, positions, "amin")
        self.pmax.scatter_reduce_(0, b, positions, "amax")


UPDATE_IN_ONE = 16  # keys up to which a CUDA summary update is one kernel (it walks them in order, one program a head)


def power_of_two(n: int) -> str | None:
    """The problem with `n` as a block size (every block's slots are one aligned run): None if it is a power of two."""
    return None if n >= 1 and n & (n - 1) == 0 else "must be a power of two"


def check_block(block: int) -> None:
    if power_of_two(block):
        raise ValueError(f"the HSR block {block} {power_of_two(block)}")


def check_eps(eps: float) -> None:
    """`eps` within the range HSRDecode declares for it (a ValueError naming it otherwise)."""
    check_value("HSR's eps", eps, float, next(f.metadata for f in fields(HSRDecode) if f.name == "eps"))


def score_bounds(q: Tensor, summary: KeySummary) -> Tensor:
    """u [B, Hq, T, blocks] (fp32, float64 for float64 queries): no key of a block scores above it for that query
    (scores scaled by D**-0.5); -inf for empty blocks."""
    B, Hq, T, D = q.shape
    Hkv = summary.kmin.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).reshape(B, Hkv, Hq // Hkv * T, D)
    filled = (summary.count > 0)[:, None]
    lo = torch.where(filled, summary.kmin.to(acc), 0.0)  # (an empty block's +-inf would make 0 * inf = nan)
    hi = torch.where(filled, summary.kmax.to(acc), 0.0)
    u = (qf.clamp(min=0) @ hi.transpose(-1, -2) + qf.clamp(max=0) @ lo.transpose(-1, -2)) * D**-0.5
    return u.masked_fill(~filled.T, -math.inf).view(B, Hq, T, -1)


@dataclass
class HSRResult:
    out: Tensor  # [B, Hq, T, D], exact attention over the read keys
    lse: Tensor  # [B, Hq, T], fp32 (float64 for float64 inputs), of the read keys
    certificate: Tensor  # [B, Hq, T]: unread softmax mass / read mass is at most this
    blocks_read: Tensor  # [B, Hkv] blocks read per KV head
    blocks_visible: Tensor  # (0-dim) blocks any query of the step can see, per KV head


def block_roles(summary: KeySummary, mask: PositionMask, sink: int, recent: int) -> tuple[Tensor, Tensor]:
    """(visible, always) [blocks]: blocks a query can see at all (filled, not entirely in the future, not entirely
    before the window), and those of them always read (holding a sink or a recent position)."""
    first, last = mask.q_pos.min(), mask.q_pos.max()
    visible = (summary.count > 0) & (summary.pmin <= last)
    if mask.window is not None:
        visible &= summary.pmax > first - mask.window
    return visible, visible & ((summary.pmin < sink) | (summary.pmax > last - recent))


# powers of two the weights are binned into, from 2^low(eps) up (`_low`): 2^(low + BINS - 1) > eps for caches of up
# to 2^26 blocks, so no weight of the top bins can go unread and more bins would change nothing; BINS + 2 bins in all
# fill the kernels' 32 lanes
BINS = 30
DENSE_SHARE = (15, 16)  # a head that read at least 15/16 of its visible blocks reads all of them for a while
PROBE_EVERY = 16  # (the next 15 steps; the 16th selects again)


def reads_everything(dense_until: Tensor, last: Tensor) -> Tensor:
    """Heads in their run of steps that read every block, at a step whose last query position is `last`."""
    return dense_until > last


def next_dense_until(dense_until: Tensor, read: Tensor, visible: Tensor, last: Tensor, tokens: int) -> Tensor:
    """The state after a step of `tokens` query tokens, the last at position `last`, that read `read` blocks of
    `visible` per head (the kernels apply the same rule). A step in the run (`reads_everything`) leaves it as it
    is. After a selection: 0 if it was not spread; if it was, -1, or where the selection before was spread too
    (-1) or the run before ended here (a position), a run of the next PROBE_EVERY - 1 steps (as positions advance
    by `tokens` a step)."""
    num, den = DENSE_SHARE
    spread = (read * den >= visible * num) & (visible > 0)
    after_selection = torch.where(spread, torch.where(dense_until != 0, last + PROBE_EVERY * tokens, -1), 0)
    return torch.where(reads_everything(dense_until, last), dense_until, after_selection).to(dense_until.dtype)


def _low(eps: float, blocks: int) -> int:
    """The lowest bin's exponent: weights below 2^low sum to at most blocks * 2^low <= eps / 2, skipped at any cut."""
    return math.floor(math.log2(eps / (2 * blocks)))


def hsr_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    summary: KeySummary,
    eps: float,
    sink: int = 64,
    recent: int = 256,
    stats: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
) -> HSRResult:
    """Decode attention of q [B, Hq, T, D] (T small) over the cache k, v [B, Hkv, S, D] reading only the blocks
    needed for the certificate to be at most `eps` for every query (module docstring). One KV head's selection
    serves all its query heads, as the kernel reads it. `stats` (float64 [3]) accumulates the blocks read, the
    blocks visible (per KV head, summed) and the largest certificate, in place. `scales`: those of k, v stored in
    one byte, read in their stored frame as the summaries are (attention/quant.py): the queries rotated to it, the
    output back; scores, and so the selection and the certificate, are the same in either frame."""
    check_eps(eps)
    if scales is not None:
        q = to_stored_frame(q)
    B, Hq, T, D = q.shape
    Hkv, nb = k.shape[1], summary.count.numel()
    low = _low(eps, nb)
    if _triton_path(q, k, mask, summary, low, scales):
        return _back(_triton_attend(q, k, v, mask, summary, eps, sink, recent, low, stats, scales), scales)
    visible, always = block_roles(summary, mask, sink, recent)
    u = score_bounds(q, summary).masked_fill(~visible, -math.inf)  # [B, Hq, T, nb]
    top = u.view(B, Hkv, -1, nb).amax(2).masked_fill(always, -math.inf)  # a block's best bound over its rows
    best = top.argmax(-1, keepdim=True)
    first = always.expand(B, Hkv, nb).clone()
    first.scatter_(2, best, top.gather(2, best) > -math.inf)
    _, L = attend_blocks(q, k, v, mask, first, summary.block, scales)
    weight = (summary.count * torch.exp(u - L[..., None])).nan_to_num(nan=0.0)  # (L = -inf: nothing visible)
    weight = weight.view(B, Hkv, -1, nb).amax(2).masked_fill(~visible, 0.0)
    # bins: floor(log2 w) - low from the exponent, -1 below 2^low (and 0), BINS at or above 2^(low + BINS)
    mantissa_exp = torch.frexp(weight).exponent - 1 - low
    bins = torch.where(weight > 0, mantissa_exp, -1).clamp(-1, BINS).masked_fill(first | weight.isinf(), BINS)
    sums = torch.zeros(B, Hkv, BINS + 2, dtype=torch.float64, device=q.device)
    sums.scatter_add_(2, bins + 1, torch.where(bins < BINS, weight, 0.0).double())
    below = sums[..., :1] + torch.cat([sums.new_zeros(B, Hkv, 1), sums[..., 1:-1].cumsum(-1)], -1)  # [.., BINS + 1]
    cut = (below <= eps).sum(-1, keepdim=True) - 1  # the weights below 2^(low + cut) sum to <= eps
    last = mask.q_pos.max()
    dense = reads_everything(summary.dense_until, last)[..., None]  # [B, Hkv, 1]: this head reads every visible block
    read = torch.where(dense, visible, bins >= cut)
    out, lse = attend_blocks(q, k, v, mask, read, summary.block, scales)
    unread = below.gather(-1, cut.clamp(min=0)).to(lse.dtype).masked_fill(dense, 0.0)  # (cut >= 0: below[0] <= eps / 2)
    scale = torch.exp(L - lse).nan_to_num(nan=1.0).view(B, Hkv, -1)  # (lse = -inf only where nothing is visible)
    certificate = (scale * unread).view(B, Hq, T)
    summary.dense_until.copy_(next_dense_until(summary.dense_until, read.sum(-1), visible.sum(), last, T))
    if stats is not None:
        stats[:2] += torch.stack([read.sum(), visible.sum() * B * Hkv]).to(stats.dtype)
        torch.maximum(stats[2], certificate.max(), out=stats[2])
    return _back(HSRResult(out, lse, certificate, read.sum(-1), visible.sum()), scales)


def _back(r: HSRResult, scales: tuple[Tensor, Tensor] | None) -> HSRResult:
    """The result with its output rotated back from the frame one-byte keys are stored in (`hsr_attend`)."""
    return r if scales is None else replace(r, out=from_stored_frame(r.out))


def _triton_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    summary: KeySummary,
    eps: float,
    sink: int,
    recent: int,
    low: int,
    stats: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
) -> HSRResult:
    """`hsr_attend` on the Triton kernels: the selection (`hsr_triton.select`), then the Lean walk over each head's
    list of blocks, whose combine writes the certificate (and raises the largest in `stats`)."""
    rule = (*DENSE_SHARE, PROBE_EVERY)
    tiles, units, dense, L, unread, read, visible = _triton().select(
        q, k, mask, summary, eps, sink, recent, BINS, low, rule, lean.default_programs(q.device), stats, scales
    )
    worst = None if stats is None else stats[2:].view(torch.int64)
    out, lse, cert = lean.lean_sparse_attend(
        q, k, v, mask, tiles, units, summary.block, dense=dense, certify=(L, unread), worst=worst, scales=scales
    )
    return HSRResult(out, lse, cert, read.view(q.shape[0], k.shape[1]), visible[0])


def attend_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: PositionMask,
    chosen: Tensor,
    block: int,
    scales: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention over the visible keys of the chosen blocks [B, Hkv, nb] of each KV head: (output in q's
    dtype, lse fp32; float64 for float64 inputs). `scales`: those of k, v stored in one byte."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    keep = chosen[..., torch.arange(k.shape[2], device=k.device) // block]  # [B, Hkv, S]
    allowed = mask.dense()[None, None, None] & keep[:, :, None, None, :]  # [B, Hkv, 1, T, S]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).reshape(B, Hkv, g, T, D) * D**-0.5
    if scales is None:
        kf, vf = k.to(acc), v.to(acc)
    else:
        kf, vf = dequantize(k, scales[0], acc), dequantize(value_rows(v, slice(0, k.shape[2])), scales[1], acc)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, kf).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(lse.isinf().unsqueeze(-1), 0.0))
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, vf)
    return out.reshape(B, Hq, T, D).to(q.dtype), lse.reshape(B, Hq, T)


def _triton_path(
    q: Tensor, k: Tensor, mask: PositionMask, summary: KeySummary, low: int, scales: tuple | None = None
) -> bool:
    """Shapes the kernels take: those of the Lean kernel, tiles of at least 16 keys (its matrix products' smallest
    side), at most 64 query rows per KV head and 1024 (batch x KV head) pairs (registers), bins in fp32's range,
    summaries in the queries' dtype and keys in it too, or in one byte with their `scales`."""
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    return (
        q.dtype != torch.float64
        and q.dtype == summary.kmin.dtype
        and (k.dtype == q.dtype or scales is not None)
        and summary.block >= 16
        and rows <= 64
        and q.shape[0] * k.shape[1] <= 1024
        and low > -126
        and lean.supports(q, k, mask)
        and _triton() is not None
    )


@cache
def _triton():
    return importlib.import_module("longctx.attention.hsr_triton") if lean.triton_available() else None


def merge_certificates(lses: Tensor, certificates: Tensor) -> Tensor:
    """The certificate of merged partials [parts, ...]: their read-mass-weighted mean (module docstring)."""
    weights = torch.softmax(lses.float(), dim=0).nan_to_num(nan=0.0)
    return (weights * certificates).sum(0)


def error_bound(certificate: Tensor, v_range: Tensor) -> Tensor:
    """The largest |o - o_read| per channel that a certificate allows, given the values' range per channel."""
    return (certificate / (1 + certificate))[..., None] * v_range


@dataclass
class HSRDecode(DecodeMethod):
    """Phase 2 reads only the key blocks needed for the unread softmax mass to be certified below `eps` (the module
    docstring), always the first `sink` and the latest `recent` tokens' blocks: Triton kernels on CUDA (inside
    CUDA-graph decode), PyTorch elsewhere. Each layer's cache keeps a `KeySummary` per block of `block` slots."""

    name: ClassVar[str] = "hsr"
    eps: float = option(
        1e-3, "the unread share of the softmax mass is at most this", low=0, high=1, low_open=True, high_open=True
    )
    block: int = option(64, "keys per summarized block (a power of two)", check=power_of_two)
    sink: int = option(64, "the first tokens, always read", low=0)
    recent: int = option(256, "the latest tokens, always read", low=0)
    # over a phase 2, on the device (a CUDA graph's replays add to it): this rank's blocks read and visible (summed
    # over layers, KV heads and steps) and the largest composed certificate
    stats: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def summarize(self) -> Summarize:
        block = self.block
        return lambda batch, kv_heads, slots, head_dim, device, dtype: KeySummary.empty(
            batch, kv_heads, slots, head_dim, block, device, dtype
        )

    def attend(self, q: Tensor, kv: LayerKV, mask: PositionMask, group: dist.ProcessGroup | None, world: int) -> Tensor:
        """HSR over this rank's cache; across ranks the partials merge as dense ones do and the certificates compose
        as the read-mass-weighted mean (`merge_certificates`), counted in `stats` (by the kernels on one rank)."""
        if self.stats is None:
            self.stats = torch.zeros(3, dtype=torch.float64, device=q.device)
        alone = world == 1
        stats = self.stats if alone else None
        r = hsr_attend(q, kv.k, kv.v, mask, kv.summary, self.eps, self.sink, self.recent, stats, kv.scales)
        if alone:
            return r.out.to(q.dtype)
        lses = [torch.empty_like(r.lse) for _ in range(world)]
        certs = [torch.empty_like(r.certificate) for _ in range(world)]
        dist.all_gather(lses, r.lse.contiguous(), group=group)
        dist.all_gather(certs, r.certificate.contiguous(), group=group)
        cert = merge_certificates(torch.stack(lses), torch.stack(certs))
        out, _ = all_gather_merge(r.out, r.lse, group)
        self.stats[0] += r.blocks_read.sum()
        self.stats[1] += r.blocks_visible * r.blocks_read.numel()
        torch.maximum(self.stats[2], cert.max(), out=self.stats[2])
        return out.to(q.dtype)

    def reset(self) -> None:
        self.stats = None

    def report(self, group: dist.ProcessGroup | None, world: int) -> dict | None:
        """The share of key blocks phase 2 read (over all ranks) and its largest certificate; None before any."""
        if self.stats is None:
            return None
        stats = self.stats.clone()
        if world > 1:
            dist.all_reduce(stats[:2], group=group)
        read, visible, worst = stats.tolist()
        return {"hsr_blocks_read_share": read / max(visible, 1), "hsr_max_certificate": worst}

    def describe(self, report: dict) -> str:
        return (
            f"hsr: phase 2 read {report['hsr_blocks_read_share']:.1%} of the key blocks; unread softmax mass at "
            f"most {report['hsr_max_certificate']:.2e} of the read"
        )

    def check_context(self, n_ctx: int, what: str) -> None:
        if self.block > n_ctx:
            raise ValueError(f"decode.block must be a power of two no larger than {what}={n_ctx}; got {self.block}")

    def cache_bytes(self, slots: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Each layer's key summaries (minimum and maximum per channel in the keys' dtype; count and positions)."""
        blocks = -(-slots // self.block)
        return 2 * kv_heads * blocks * head_dim * itemsize + 3 * blocks * 8

    def workspace_bytes(self, heads: int, kv_heads: int, head_dim: int, queries: int, slots: int, itemsize: int) -> int:
        """Bytes `hsr_attend`'s PyTorch path holds beyond its inputs for T queries over S slots in `blocks` blocks (the
        CUDA kernels hold less): the larger of the bounds (q and its two parts, the summaries in the exact dtype, two
        products and their sum [Hq, T, blocks]) and the attention over the chosen blocks (the dense mask and chosen
        keys, fp32 scores and probabilities, K and V in the exact dtype), next to the bounds and the weights
        [Hq, T, blocks] and the per-block bins and sums."""
        D, Hq, Hkv, T, S = head_dim, heads, kv_heads, queries, slots
        blocks, e = -(-S // self.block), max(itemsize, 4)
        bounds = 3 * Hq * T * D * e + 2 * Hkv * blocks * D * e + 3 * Hq * T * blocks * e
        attend = T * S + Hkv * T * S + 2 * Hq * T * S * e + 2 * Hkv * S * D * e + Hq * T * D * (e + 4)
        return max(bounds, attend) + 3 * Hq * T * blocks * e + Hkv * blocks * 32
