"""Prefill + decode over a preallocated KV cache, with greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.conf.schema import check_fields, option
from longctx.models.cuda_graph import GraphedDecoder
from longctx.models.tokenizer import Tokenizer
from longctx.models.transformer import Transformer


@dataclass
class SamplingOptions:
    """How a token is drawn from the logits: the options of task=generate as well (tasks/generate.py)."""

    temperature: float = option(0.0, "0 is greedy", low=0)
    top_k: int | None = option(None, "sample among the k likeliest tokens", low=1)
    top_p: float | None = option(
        None, "sample within the smallest set of tokens of this much probability", low=0, high=1, low_open=True
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Sampling(SamplingOptions):
    seed: int | None = None


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """One token id (a 0-d long tensor, on the logits' device) from the logits [vocab] of the last position.

    Nothing here waits for the device: a draw is the argmax of the probabilities over exponential noise, which picks
    each token with its probability as `torch.multinomial` does, without its device-side assertion on logits that are
    not finite (`_Drawn` reports those), and top-p masks by a scatter rather than by boolean indexing."""
    if s.temperature == 0:
        return logits.argmax()
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # tokens after the nucleus is already full
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    # (noise of 0, which a uniform draw of exactly 0 or 1 can give, would make a masked token's 0 / 0 a NaN, the max)
    noise = torch.empty_like(logits).exponential_(generator=generator).clamp_min_(torch.finfo(logits.dtype).tiny)
    return (logits.softmax(-1) / noise).argmax()


class _Drawn:
    """A token drawn on the device, on its way to the host with whether its logits were finite. Reading it waits for
    the work queued before the draw only, not for a decode step queued after it (`generate_tokens` runs ahead)."""

    def __init__(self, logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> None:
        self.token = sample(logits, sampling, generator)
        pair = torch.stack([self.token, torch.isfinite(logits).all().long()])
        self.ready = None
        if pair.is_cuda:
            self.host = torch.empty(2, dtype=torch.long, pin_memory=True).copy_(pair, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = pair

    def read(self, position: int) -> int:
        """The token id, drawn from the logits at `position`."""
        if self.ready is not None:
            self.ready.synchronize()
        token, finite = self.host.tolist()
        if not finite:
            raise ValueError(
                f"the model produced NaN or infinite logits at position {position}: its weights or the dtype's range "
                "are at fault (try dtype=fp32 or bf16, or check the checkpoint)"
            )
        return token


def generate_tokens(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    max_seq_len: int | None = None,
    context_len: int | None = None,
    cuda_graphs: bool = True,
    ahead: bool | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (a stop id is yielded, then generation ends).

    The prompt's first `context_len` tokens (default: all but the last) are the context, encoded in phase 1 by the
    model's attention strategy, shard by shard over ranks; the rest is the query, which with the generated tokens
    goes through phase 2. Every rank runs this same loop and yields the same tokens. The prompt's pieces are
    rotated as one forward pass over the whole prompt would rotate them, each new token as its own step; a model
    that re-encodes its sequence when it first runs past its rope's switch (`ModelArgs.reencode_position`) does so.

    `ahead` (default: on CUDA) queues each decode step before the token it takes reaches the host, so the device
    does not wait on the host's reading, yielding and launching between steps (figure `decode-ahead`, BENCHMARKS.md);
    a generation ended by a stop id has then run one step past it, whose logits nobody reads.
    """
    sampling = sampling or Sampling()
    limit = max_seq_len or model.args.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds the maximum context of "
            f"{limit} tokens; shorten the prompt, lower max_new_tokens, or raise max_seq_len if the model supports it"
        )
    n_ctx = len(prompt) - 1 if context_len is None else min(max(context_len, 0), len(prompt) - 1)
    strategy = model.attention
    device = model.tok_embeddings.weight.device
    ahead = device.type == "cuda" if ahead is None else ahead
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    slots = strategy.cache_slots(n_ctx, len(prompt) - n_ctx + max_new_tokens)
    model.setup_cache(1, slots, dtype=strategy.kv_dtype, summarize=strategy.summarize)
    seq = list(prompt)
    reencode_at = model.args.reencode_position()
    with torch.inference_mode():
        logits = prefill(model, torch.tensor(seq, device=device), n_ctx)
        last = len(prompt) + max_new_tokens - 1
        graphed = (
            GraphedDecoder(model) if cuda_graphs and device.type == "cuda" and _graph_capturable(strategy) else None
        )

        def step(token: Tensor, pos: int) -> _Drawn:
            if graphed is not None:
                logits = graphed.step(token, pos)
            else:
                logits = model(token.view(1, 1), torch.tensor([pos], device=device))
            return _Drawn(logits[0, -1], sampling, generator)

        drawn = _Drawn(logits[0, -1], sampling, generator)
        for pos in range(len(prompt), last + 1):
            # the step that takes this token, queued before the token reaches the host (not the first step, which
            # may compile kernels, nor a re-encoding): the device works while the host reads, yields and launches
            early = ahead and len(prompt) < pos < last and pos != reencode_at
            if early:
                upcoming = step(drawn.token, pos)
            tok = drawn.read(pos - 1)
            yield tok
            if tok in stop_ids or pos == last:
                return
            seq.append(tok)
            if early:
                drawn = upcoming
            elif pos == reencode_at:  # the sequence runs past the rope's switch: every key again, as the model does
                model.cache.reset()
                logits = prefill(model, torch.tensor(seq, device=device), n_ctx)
                graphed = GraphedDecoder(model) if graphed is not None else None
                drawn = _Drawn(logits[0, -1], sampling, generator)
            else:
                drawn = step(drawn.token, pos)


def prefill(model: Transformer, tokens: Tensor, n_ctx: int) -> Tensor:
    """The last logits of `tokens` fed as a prompt: its first `n_ctx` through phase 1, a chunk of this rank's tokens
    per pass (`AttentionStrategy.context_passes`), the rest through phase 2, rotated as one forward pass over all of
    them would rotate them (`span`)."""
    strategy, n = model.attention, tokens.numel()
    if n_ctx:
        strategy.set_phase("context")
        for local in strategy.context_passes(n_ctx):
            if local is None:
                strategy.idle_pass(model.cache)
                continue
            local = local.to(tokens.device)
            model(tokens[local][None], local, last_only=True, span=n)
    strategy.set_phase("query")
    query = torch.arange(n_ctx, n, device=tokens.device)
    return model(tokens[None, n_ctx:], query, last_only=True, span=n)


def _graph_capturable(strategy) -> bool:
    """One rank, or ranks whose collectives NCCL can record into a CUDA graph (gloo's cannot). Sparse decode too:
    its selection stays on the device."""
    return strategy.world == 1 or dist.get_backend(strategy.group) == "nccl"


def chat_prompt(tokenizer: Tokenizer, context: str, query: str, answer_prefix: str = "") -> tuple[list[int], int]:
    """Token ids of a one-message chat of `context` + `query`, and how many of them are the context; an
    `answer_prefix` follows the assistant's header (the start of the answer, as RULER gives it).

    The split is where the context's text ends in the rendered chat; a tokenizer merge across that point moves it
    to the longest prefix the two encodings share, so the split is always a valid one.
    """
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": context + query}]) + answer_prefix
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    head = tokenizer.encode(rendered[: rendered.index(context) + len(context)], add_special_tokens=False)
    n = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
    return ids, n


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    stop_reason: str = "length"  # "length", "eos" or "stop_string"


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[dict] | list[int],
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    stop_strings: tuple[str, ...] = (),
    on_text: Callable[[str], None] | None = None,
    max_seq_len: int | None = None,
    context_len: int | None = None,
) -> Generation:
    """Generate from a text prompt, chat messages (rendered with the chat template) or token ids.

    `context_len` splits the prompt's tokens into context (phase 1) and query (phase 2); see `generate_tokens`.

    Text is passed to `on_text` as it becomes final: held back while it could still be the start of a stop
    string or an incomplete UTF-8 character.
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif prompt and isinstance(prompt[0], dict):
        ids = tokenizer.encode_chat(prompt)
    else:
        ids = list(prompt)
    stop_ids = set(model.args.eos_token_ids) | {i for i in (tokenizer.eos_id,) if i is not None}
    out: list[int] = []
    text, emitted, reason = "", 0, "length"
    hold = max((len(s) for s in stop_strings), default=1) - 1
    for tok in generate_tokens(model, ids, max_new_tokens, sampling, stop_ids, max_seq_len, context_len):
        if tok in stop_ids:
            reason = "eos"
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
        if hit >= 0:
            text, reason = text[:hit], "stop_string"
            break
        ready = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
        if on_text and ready > emitted:
            on_text(text[emitted:ready])
            emitted = ready
    if on_text and len(text) > emitted:
        on_text(text[emitted:])
    return Generation(text, out, len(ids), reason)
