"""Rope scalings (YaRN, dynamic NTK, LongRoPE, partial rotary) and the Phi-3 family against transformers (fp32):
whole prompts, the cache's call sequence, every strategy, and configs that are wrong."""

from __future__ import annotations

import json

import pytest
import torch

from longctx import attention, models
from longctx.models.generate import generate_tokens
from tests.distributed import run_ranks
from tests.helpers import SCALED, star_reference

ORIGINAL = 32  # the original context of the scaled test configs
N_CTX, N_QUERY, N_NEW = 37, 5, 6  # a prompt past the original context


def _tokens(shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(SCALED))
def test_logits_match_transformers(family, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    for n in (24, 80):  # within the original context, then past it (dynamic and LongRoPE switch there)
        tokens = _tokens((2, n), seed=n)
        with torch.no_grad():
            ref, got = hf(tokens).logits, model(tokens, torch.arange(n))
        assert ref.abs().max() > 1.0
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"{family}, {n} tokens")


def test_scalings_are_read_from_config(hf_checkpoint):
    """The features the parity test relies on are really switched on by the configs."""
    args = {f: models.ModelArgs.from_json(hf_checkpoint(f)[1] / "config.json") for f in SCALED}
    assert {f: (a.rope_scaling or {}).get("rope_type") for f, a in args.items()} == {
        "llama_yarn": "yarn",
        "qwen2_yarn": "yarn",
        "qwen3_yarn": "yarn",
        "llama_dynamic": "dynamic",
        "phi3_longrope": "longrope",
        "phi3": None,
        "mistral_nemo": None,
    }
    phi3 = args["phi3_longrope"]
    assert phi3.rotary_dim == 8 and phi3.head_dim == 16 and phi3.layer_windows == (24, 24, 24)
    assert phi3.rope_scaling["original_max_position_embeddings"] == ORIGINAL
    assert args["qwen2_yarn"].rope_theta == 20000.0 and args["qwen2_yarn"].rope_scaling["beta_fast"] == 16.0
    assert args["mistral_nemo"].head_dim == 24 and args["mistral_nemo"].rope_theta == 1e6
    # YaRN and dynamic NTK run at the context they extend the original to
    assert args["llama_yarn"].max_seq_len == 4 * ORIGINAL and args["qwen3_yarn"].max_seq_len == 3 * ORIGINAL
    assert args["llama_dynamic"].max_seq_len == 2 * ORIGINAL and args["phi3_longrope"].max_seq_len == 128


def _hf_steps(hf, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """transformers' logits through its cache: the prompt in one call, then one token per call."""
    with torch.no_grad():
        out = hf(tokens[:, :prompt], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for i in range(prompt, tokens.shape[1]):
            out = hf(tokens[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "family,prompt", [("llama_dynamic", 24), ("llama_dynamic", 40), ("phi3_longrope", 24), ("qwen2_yarn", 24)]
)
def test_cached_decode_follows_transformers_call_sequence(family, prompt, hf_checkpoint):
    """Keys cached at one length, queries at the next: a prompt inside the original context decoded past it sees
    the frequencies transformers uses for the same calls (dynamic NTK: each step's own length)."""
    hf, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    tokens = _tokens((1, prompt + 16), seed=3)
    ref = _hf_steps(hf, tokens, prompt)
    model.setup_cache(1, tokens.shape[1])
    with torch.no_grad():
        # the prompt in two pieces (context, then query), rotated as one call over all of it
        steps = [model(tokens[:, : prompt - 3], torch.arange(prompt - 3), span=prompt)]
        steps.append(model(tokens[:, prompt - 3 : prompt], torch.arange(prompt - 3, prompt), span=prompt))
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(prompt, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("family", ["llama_dynamic", "phi3_longrope"])
def test_greedy_generation_matches_transformers_across_the_original_context(family, ahead, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    prompt = _tokens((1, 26), seed=4)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(generate_tokens(model, prompt[0].tolist(), 14, max_seq_len=128, ahead=ahead)) == ref[0, 26:].tolist()


@pytest.mark.parametrize("family", ["llama_yarn", "phi3_longrope"])
def test_cached_decode_equals_full_forward(family, hf_checkpoint):
    _, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    tokens = _tokens((1, 56), seed=5)
    with torch.no_grad():
        full = model(tokens, torch.arange(56))
        model.setup_cache(1, 56)
        steps = [model(tokens[:, :40], torch.arange(40))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(40, 56)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_yarn", "phi3_longrope", "llama_dynamic"])
def test_star_blocks_are_rotated_as_the_whole_prompt(family, hf_checkpoint):
    """Star's phase 1 built independently: transformers in float64 on each [anchor; block] sequence, its rotary held
    at the whole prompt's length (one call over the prompt would use these frequencies for every block)."""
    hf, path = hf_checkpoint(family, sliding_window=None) if family == "phi3_longrope" else hf_checkpoint(family)
    block, anchor = 10, 4
    hf64 = hf.double()
    tokens = _tokens((N_CTX,), seed=1)
    star = models.load_model(
        path, dtype=torch.float32, attention=attention.build("star", block_size=block, anchor_size=anchor)
    )
    with torch.no_grad():
        got = star(tokens[None], torch.arange(N_CTX), span=N_CTX + N_QUERY)[0]
        rotary = hf64.model.rotary_emb
        hf64(tokens[None, :1], position_ids=torch.tensor([[N_CTX + N_QUERY - 1]]))  # sets the prompt's frequencies
        rotary.rope_type = "default"  # ... and keeps them for the shorter calls below
    want = star_reference(hf64, tokens, block, anchor)
    hf.float()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def _multi_rank_worker(rank, world, paths):
    out = {}
    prompt = _tokens((N_CTX + N_QUERY,), seed=2)
    for family, path in paths.items():
        for kind in ("ring", "star"):
            strategy = attention.build(kind, **({"block_size": 10, "anchor_size": 6} if kind == "star" else {}))
            model = models.load_model(path, dtype=torch.float32, attention=strategy)
            idx = strategy.context_indices(N_CTX)
            with torch.no_grad():
                logits = model(prompt[idx][None], idx, span=N_CTX + N_QUERY)[0]
            skip = 6 if kind == "star" and strategy.recomputes_anchor and rank else 0
            out[family, kind] = {
                "idx": idx[skip:],
                "logits": logits[skip:],
                "generated": torch.tensor(list(generate_tokens(model, prompt.tolist(), N_NEW, context_len=N_CTX))),
            }
    return out


def test_ring_and_star_on_two_ranks_equal_one_rank(hf_checkpoint):
    paths = {f: str(hf_checkpoint(f)[1]) for f in ("qwen2_yarn", "phi3_longrope", "llama_dynamic")}
    results = run_ranks(2, _multi_rank_worker, paths)
    prompt = _tokens((N_CTX + N_QUERY,), seed=2)
    for family, path in paths.items():
        for kind in ("ring", "star"):
            # one rank: global for ring (exact), star with the same blocks for star
            one = attention.build("global") if kind == "ring" else attention.build("star", block_size=10, anchor_size=6)
            model = models.load_model(path, dtype=torch.float32, attention=one)
            with torch.no_grad():
                ref = model(prompt[None, :N_CTX], torch.arange(N_CTX), span=N_CTX + N_QUERY)[0]
            want = list(generate_tokens(model, prompt.tolist(), N_NEW, context_len=N_CTX))
            got = torch.full_like(ref, float("nan"))
            for r in results:
                got[r[family, kind]["idx"]] = r[family, kind]["logits"]
                assert r[family, kind]["generated"].tolist() == want, f"{family} {kind}"
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"{family} {kind}")


# --- configs that are wrong stop before loading, naming config.json and the key


def _config(hf_checkpoint, family: str, tmp_path, change) -> str:
    _, path = hf_checkpoint(family)
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


@pytest.mark.parametrize(
    "family,change,message",
    [
        (
            "llama_yarn",
            lambda c: c["rope_parameters"].update(rope_type="ntk-by-parts"),
            "rope type 'ntk-by-parts' is not",
        ),
        ("llama_yarn", lambda c: c["rope_parameters"].pop("factor"), r"rope_parameters of type 'yarn' lacks factor"),
        (
            "llama_dynamic",
            lambda c: c["rope_parameters"].update(factor=-2),
            r"rope_parameters.factor must be a finite number in \(0, inf\)",
        ),
        ("phi3_longrope", lambda c: c["rope_parameters"]["long_factor"].pop(), r"long_factor has 3 entries; .* need 4"),
        ("phi3_longrope", lambda c: c["rope_parameters"].update(short_factor="1.0"), r"short_factor must be a list"),
        ("phi3_longrope", lambda c: c["rope_parameters"].update(rope_type="dynamic"), r"Phi3ForCausalLM takes rope"),
        (
            "phi3_longrope",
            lambda c: c.update(partial_rotary_factor=1.5),
            r"partial_rotary_factor must be a finite number in \(0, 1\]",
        ),
        ("qwen2_yarn", lambda c: c["rope_parameters"].update(truncate="yes"), r"rope_parameters.truncate must be"),
    ],
)
def test_malformed_scaling_names_config_json_and_the_key(family, change, message, hf_checkpoint, tmp_path):
    path = _config(hf_checkpoint, family, tmp_path, change)
    with pytest.raises(ValueError, match=message) as e:
        models.ModelArgs.from_json(path)
    assert str(e.value).startswith(path)


def test_old_spellings_read_as_the_new(hf_checkpoint, tmp_path):
    """`rope_scaling` + `type` (and Phi-3's `su`) give what `rope_parameters` + `rope_type` give."""
    _, path = hf_checkpoint("phi3_longrope")
    new = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    block = {k: v for k, v in new["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
    old.update(rope_theta=new["rope_parameters"]["rope_theta"], rope_scaling={**block, "type": "su"})
    assert models.ModelArgs.from_hf(old) == models.ModelArgs.from_hf(new)
