"""One decoder-only Transformer for Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 3 and Phi-3.

RMSNorm, rotary embeddings (models/rope.py), grouped-query attention and a gated MLP; which biases, norms,
activations, windows and ropes a family uses comes from `ModelArgs`. Attention itself is delegated to an `AttentionStrategy` held by
the model, so parallelism (ring, star) is applied from outside by swapping the strategy, never by editing this file.
The model holds the KV cache (`attention.cache.KVCache`, made by `setup_cache`) and hands each layer's part to the
strategy; what the cache keeps beyond keys and values, and how phase 2 reads it, is the strategy's business.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.attention import AttentionStrategy, GlobalAttention
from longctx.attention.cache import KVCache, LayerKV, Summarize
from longctx.attention.fusion import fused_on_cuda
from longctx.attention.strategy import Step
from longctx.models.config import ModelArgs
from longctx.models.rope import Rotary


def _rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """RMSNorm times `weight`, or times `offset + weight` in fp32 before the cast back (Gemma), as each family's
    reference rounds it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


rms_norm = fused_on_cuda(_rms_norm)


@fused_on_cuda
def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """The residual sum x + y and its RMSNorm, in one pass."""
    h = x + y
    return h, _rms_norm(h, weight, eps, offset)


@fused_on_cuda
def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q and k in the half-split layout of Hugging Face checkpoints; cos/sin are [T, rotary dims]:
    the first that many dims of each head turn, the rest pass through."""
    r = cos.shape[-1]

    def rotate(x: Tensor) -> Tensor:
        turned, rest = x[..., :r], x[..., r:]
        x1, x2 = turned.chunk(2, dim=-1)
        out = turned * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    return rotate(q), rotate(k)


@fused_on_cuda
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@fused_on_cuda
def gelu_tanh_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.gelu(gate, approximate="tanh") * up


@fused_on_cuda
def gelu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.gelu(gate) * up


GATED_ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul, "gelu": gelu_mul}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        # With an offset the checkpoint stores w of x * (offset + w): 0 is the identity.
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


class FusedLinear(nn.Linear):
    """Several projections of one input in a single matmul (one weight read, one launch in decode).

    Checkpoints store the parts apart; `rows(i)` is where part i lives in the fused weight.
    """

    def __init__(self, in_features: int, splits: tuple[int, ...], bias: bool):
        super().__init__(in_features, sum(splits), bias=bias)
        self.splits = splits

    def rows(self, part: int) -> slice:
        start = sum(self.splits[:part])
        return slice(start, start + self.splits[part])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return super().forward(x).split(self.splits, dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = FusedLinear(args.dim, (q_size, kv_size, kv_size), bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
        # Every kernel scales scores by head_dim**-0.5; a family with another query scale pre-scales q.
        self.q_scale = 1.0 if args.attn_scale is None else args.attn_scale * args.head_dim**0.5

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        strategy: AttentionStrategy,
        step: Step,
        window: int | None,
        kv: LayerKV | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        y = strategy.attend(q, k, v, kv, step, window)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    # Tokens per pass: a 512K-token prefill would otherwise hold [tokens, intermediate] activations of over 40 GB at
    # once for Llama-3-8B.
    chunk: int = 32768

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = FusedLinear(args.dim, (args.intermediate_size,) * 2, bias=args.mlp_bias)  # gate, up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)  # down
        self.act_mul = GATED_ACTIVATIONS[args.mlp_act]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] <= self.chunk:
            return self._swiglu(x)
        out = torch.empty_like(x)
        for i in range(0, x.shape[1], self.chunk):
            out[:, i : i + self.chunk] = self._swiglu(x[:, i : i + self.chunk])
        return out

    def _swiglu(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x)
        return self.w2(self.act_mul(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        if args.sandwich_norms:  # Gemma: the outputs of attention and MLP are normed before the residual add
            self.attention_post_norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
            self.ffn_post_norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)

    def forward(self, x, cos, sin, strategy, step, window, kv) -> Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, strategy, step, window, kv)
        if hasattr(self, "attention_post_norm"):
            attended = self.attention_post_norm(attended)
        h, normed = add_rms_norm(x, attended, self.ffn_norm.weight, self.ffn_norm.eps, self.ffn_norm.offset)
        out = self.feed_forward(normed)
        if hasattr(self, "ffn_post_norm"):
            out = self.ffn_post_norm(out)
        return h + out


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attention: AttentionStrategy | None = None):
        super().__init__()
        self.args = args
        self.attention = attention or GlobalAttention()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.init_buffers(None)
        self.cache: KVCache | None = None

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self, device: torch.device | str | None) -> None:
        """(Re)compute the non-persistent buffers, e.g. after building on the meta device: the rotary frequencies of
        each distinct rope (`ModelArgs.ropes`)."""
        dim = self.args.rotary_dim
        self.rotary = nn.ModuleList(Rotary(theta, scaling, dim, device) for theta, scaling in self.args.ropes())

    def setup_cache(
        self, batch: int, slots: int, dtype: torch.dtype | None = None, summarize: Summarize | None = None
    ) -> KVCache:
        """Allocate a KV cache of `slots` tokens per layer, stored in the weights' dtype unless `dtype` says otherwise
        (one byte, FP8 or int8, keeps per-token scales beside it: attention/cache.py), with the per-block summaries a
        strategy's decode method asks for (`summarize`)."""
        ref = self.tok_embeddings.weight
        if self.cache is not None:  # the old cache goes before the new one is made: never two at once
            held = weakref.ref(self.cache.layers[0].k)
            self.cache = None
            # also where a reference cycle still holds it (a GPU run peaked a whole cache over its plan); only then,
            # as a pass of the collector costs a quarter of a second in a process that has compiled kernels
            if held() is not None and held().device.type != "cpu":
                gc.collect()
        self.cache = KVCache(
            self.args.n_layers,
            batch,
            self.args.n_kv_heads,
            slots,
            self.args.head_dim,
            dtype or ref.dtype,
            ref.device,
            summarize,
            ref.dtype,
        )
        return self.cache

    def forward(self, tokens: Tensor, positions: Tensor, last_only: bool = False, span: int | None = None) -> Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`) of `tokens` [B, T] at `positions` [T].

        What the tokens attend to, and which of them the KV cache keeps, is the attention strategy's business:
        with `global` and a cache, they are appended and attend to everything cached; without a cache, they attend
        among themselves. `span`: the length of the sequence these tokens are a piece of (a prompt fed as shards,
        blocks or context then query), for ropes that depend on it (models/rope.py); default: the last position + 1.
        """
        T = tokens.shape[1]
        if positions.shape != (T,):
            raise ValueError(f"positions must have shape ({T},), one per token; got {tuple(positions.shape)}")
        step = self.attention.begin(self.cache, positions, set(self.args.layer_windows))
        h = self.tok_embeddings(tokens)
        if self.args.embed_scale != 1.0:  # rounded to the activations' dtype first, as Gemma's reference does
            h = h * float(torch.tensor(self.args.embed_scale, dtype=h.dtype))
        length = None
        if span is not None and any(r.length_dependent for r in self.rotary):
            length = torch.tensor(span, device=positions.device)
        rotations = [tuple(t.to(h.dtype) for t in rotary(positions, length)) for rotary in self.rotary]
        kvs = self.cache.layers if self.cache is not None else [None] * len(self.layers)
        for layer, window, rope, kv in zip(self.layers, self.args.layer_windows, self.args.layer_rope, kvs):
            h = layer(h, *rotations[rope], self.attention, step, window, kv)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        logits = self.output(h)
        if self.args.final_softcap is not None:
            logits = torch.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        return logits
