"""The real SmolLM2-135M-Instruct checkpoint against transformers reading the same GGUF."""

from __future__ import annotations

import torch

from longctx import models
from tests.helpers import corpus


def test_answers_capital_of_france(smollm2_dir):
    model, tok = models.load(smollm2_dir, dtype=torch.float32)
    pieces: list[str] = []
    out = models.generate(
        model, tok, [{"role": "user", "content": "What is the capital of France?"}], 30, on_text=pieces.append
    )
    assert "Paris" in out.text
    assert "".join(pieces) == out.text
    assert out.stop_reason == "eos"


def test_logits_match_transformers_on_a_long_prompt(smollm2_dir, smollm2_reference):
    hf, hf_tok = smollm2_reference
    model, tok = models.load(smollm2_dir, dtype=torch.float32)
    doc = corpus()
    messages = [{"role": "user", "content": f"Summarize this code:\n{doc}"}]
    ids = tok.encode_chat(messages)[:1000]
    assert len(ids) == 1000
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(tokens).logits
        got = model(tokens, torch.arange(1000))
    assert ref.abs().max() > 10
    # 30 fp32 layers over 1,000 tokens: summation order alone moves logits of magnitude ~30 by ~1e-4.
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_stop_strings_end_generation(smollm2_dir):
    model, tok = models.load(smollm2_dir, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = models.generate(model, tok, msgs, 30).text
    stop = full.split()[2]  # a word from the middle of the free answer
    pieces: list[str] = []
    out = models.generate(model, tok, msgs, 30, stop_strings=(stop,), on_text=pieces.append)
    assert out.stop_reason == "stop_string"
    assert out.text == full[: full.index(stop)]
    assert "".join(pieces) == out.text
