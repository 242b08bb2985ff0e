"""Models: one parametrized decoder-only Transformer, its loading, tokenizers and generation.

model, tokenizer = models.load("path/to/hf-checkpoint", dtype=torch.bfloat16, device="cuda")
logits = model(tokens, positions)
print(models.generate(model, tokenizer, [{"role": "user", "content": "Hi"}]).text)
"""

from __future__ import annotations

from pathlib import Path

import torch

from longctx.attention import AttentionStrategy
from longctx.models.config import SUPPORTED_ARCHITECTURES, ModelArgs
from longctx.models.generate import Generation, Sampling, SamplingOptions, chat_prompt, generate, generate_tokens
from longctx.models.loading import Slicing, load_model, random_model
from longctx.models.tokenizer import Tokenizer
from longctx.models.transformer import Transformer


def load(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: AttentionStrategy | None = None,
    tp: Slicing | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of a Hugging Face-layout checkpoint directory (with `tp`, one rank's slices of the
    model: parallel/tensor.py)."""
    model = load_model(path, dtype=dtype, device=device, attention=attention, tp=tp)
    return model, Tokenizer.from_dir(path)


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Generation",
    "ModelArgs",
    "Sampling",
    "SamplingOptions",
    "Tokenizer",
    "Transformer",
    "chat_prompt",
    "generate",
    "generate_tokens",
    "load",
    "load_model",
    "random_model",
]
