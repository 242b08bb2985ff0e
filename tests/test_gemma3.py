"""Gemma 3: the family's config keys read into ModelArgs, parity with transformers beyond the shared family tests,
and the configs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx import models
from tests.helpers import TINY, randomize_norms

# Shapes of their own: 3 KV heads under 6 query heads, a window of 8, the older `sliding_window_pattern`
# (every 2nd layer full), transformers-4 style rope keys with scaling on the full layers; one KV head, a 12-token
# window, an irregular layer pattern, an untied output, no logit cap.
VARIANTS = {
    "pattern_and_v4_rope": dict(
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, head_dim=8, hidden_size=48,
        sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=8,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=20000.0, rope_local_base_freq=50.0,
        hidden_activation="gelu",  # exact GELU: an activation Gemma 3 releases do not use, but the config allows
    ),
    "one_kv_head_no_cap": dict(
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32, final_logit_softcapping=None, tie_word_embeddings=False,
    ),
}  # fmt: skip


def _gemma(tmp_path, seed=0, **config):
    import transformers

    cfg = transformers.Gemma3TextConfig(**(TINY | config))
    torch.manual_seed(seed)
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    randomize_norms(hf, seed)
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_transformers(variant, tmp_path):
    hf, path = _gemma(tmp_path, **VARIANTS[variant])
    model = models.load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 60), generator=torch.Generator().manual_seed(5))  # > windows
    with torch.no_grad():
        ref, got = hf(tokens).logits, model(tokens, torch.arange(60))
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cached_decode_equals_full_forward(tmp_path):
    """Per-layer rope and windows hold in decode steps through the KV cache too."""
    _, path = _gemma(tmp_path, **VARIANTS["pattern_and_v4_rope"])
    model = models.load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens, torch.arange(40))
        model.setup_cache(1, 40)
        steps = [model(tokens[:, :25], torch.arange(25))] + [
            model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(25, 40)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


# A two-layer Gemma 3 text config (both layers sliding, windows of 8).
SMALL_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 96,
    "sliding_window": 8,
}


def test_text_config_nesting_reads_as_the_text_model():
    text = SMALL_TEXT
    nested = models.ModelArgs.from_hf(
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text}
    )
    plain = models.ModelArgs.from_hf({"model_type": "gemma3_text", **text})
    assert nested == plain and plain.architecture == "Gemma3ForCausalLM" and plain.layer_windows == (8, 8)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vision_config": {"hidden_size": 1152}}, "vision"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 4.0}}, "ntk-by-parts"),
    ],
)
def test_unsupported_keys_are_refused_by_name(change, message):
    cfg = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **SMALL_TEXT}
    if "vision_config" in change:
        cfg = {"model_type": "gemma3", "text_config": cfg}
    with pytest.raises(ValueError, match=message):
        models.ModelArgs.from_hf(cfg | change)


def test_loading_refuses_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        models.ModelArgs.from_json(tmp_path / "config.json")


# --- the real Gemma 3 270M, against transformers' own reading of the same GGUF


LICENCES = Path("/usr/share/common-licenses")  # prose every Debian-family machine holds


def _licence_texts() -> dict[str, str]:
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(LICENCES.iterdir()) if f.is_file()}


def test_gemma3_270m_logits_and_tokens_match_transformers(gemma3_dir, gemma3_gguf):
    from tests.helpers import transformers_reading

    model, tok = models.load(gemma3_dir, dtype=torch.float32)
    ref, ref_tok = transformers_reading(gemma3_gguf)
    # Real text with digits, runs of spaces and newlines, non-ASCII. Runs of more than 31 spaces (the longest
    # whitespace piece) are left out: there transformers' BPE splits 33 spaces as 16 + 17, while SentencePiece and
    # llama.cpp take the longest piece first (31 + 2), checked below.
    extra = "Prices: 1234567 € and ¥89; naïve café, Straße, 東京, Привет.\n\n\t\tindented   three   spaces  \n"
    texts = [t for t in _licence_texts().values() if " " * 32 not in t] + [extra]
    total = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref_tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        total += len(ids)
    assert total > 20_000
    runs = tok.encode(" " * 33, add_special_tokens=False)
    assert [tok.decode([i]) for i in runs] == [" " * 31, " " * 2]
    ids = torch.tensor([tok.encode(_licence_texts()["Apache-2.0"])[:1100]])  # past the 512-token window
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids, torch.arange(ids.shape[1]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _needle_prompt(tok) -> tuple[list[int], int, str]:
    """A number hidden at 60% of about 2,500 tokens of prose: (token ids, context tokens, the number)."""
    prose = " ".join(_licence_texts()["Apache-2.0"].split())
    prose = tok.decode(tok.encode(prose, add_special_tokens=False)[:2450])
    at = prose.index(". ", int(0.6 * len(prose))) + 2
    needle = "One of the special magic numbers for quiet-harbor is: 4718293. "
    context = "Some special magic numbers are hidden within the following text.\n\n" + prose[:at] + needle + prose[at:]
    query = "\n\nWhat is the special magic number for quiet-harbor mentioned in the text? The number is"
    return tok.encode(context + query), len(tok.encode(context)), "4718293"


def _ranks_worker(rank, world, path):
    from longctx import attention

    model, tok = models.load(path, dtype=torch.float32, attention=attention.build("ring"))
    ids, n_ctx, _ = _needle_prompt(tok)
    answers = {}
    for name, params in (("ring", {}), ("star", {"block_size": 700, "anchor_mode": "recompute"})):
        model.attention = attention.build(name, **params)
        answers[name] = list(models.generate_tokens(model, ids, 12, context_len=n_ctx))
    return answers


def test_gemma3_270m_finds_a_number_in_prose_on_one_and_two_ranks(gemma3_dir):
    """Global finds the number; ring on 2 gloo ranks generates global's tokens; star (blocks of 700, recompute) on
    2 ranks generates what star with the same blocks does on one rank, and finds the number too."""
    from longctx import attention
    from tests.distributed import run_ranks

    model, tok = models.load(gemma3_dir, dtype=torch.float32)
    ids, n_ctx, number = _needle_prompt(tok)
    want = {}
    for name, params in (("ring", {}), ("star", {"block_size": 700})):
        model.attention = attention.build("global" if name == "ring" else name, **params)
        want[name] = list(models.generate_tokens(model, ids, 12, context_len=n_ctx))
        assert number in tok.decode(want[name]), (name, tok.decode(want[name]))
    for r in run_ranks(2, _ranks_worker, str(gemma3_dir)):
        assert r == want
