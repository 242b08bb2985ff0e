"""Our Transformer against `transformers` on tiny random checkpoints of every family (fp32)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from longctx import models
from longctx.models.generate import Sampling, generate_tokens, sample
from tests.helpers import FAMILIES


def _logits_pair(hf, ours, tokens):
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens, torch.arange(tokens.shape[1]))
    return ref, got


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    # 80 tokens: past the sliding windows (16) and past Llama-3.1's original context (32) under rope scaling.
    tokens = torch.randint(0, hf.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1))
    ref, got = _logits_pair(hf, model, tokens)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_family_features_are_read_from_config(hf_checkpoint):
    """The features the parity test relies on are really switched on by the configs."""
    args = {f: models.ModelArgs.from_json(hf_checkpoint(f)[1] / "config.json") for f in FAMILIES}
    assert args["llama3"].rope_scaling["rope_type"] == "llama3" and not args["llama3"].tie_embeddings
    assert args["llama_linear_tied"].rope_scaling["rope_type"] == "linear" and args["llama_linear_tied"].tie_embeddings
    assert args["mistral"].layer_windows == (16, 16, 16)
    assert args["qwen2"].qkv_bias and not args["qwen2"].o_bias
    assert args["qwen2"].layer_windows == (None, 16, 16)  # layers from max_window_layers on slide
    assert args["qwen3"].qk_norm and args["qwen3"].head_dim == 24
    assert args["llama3"].layer_windows == (None, None, None)
    gemma = args["gemma3"]
    assert gemma.layer_windows == (16, None, 16) and gemma.sandwich_norms and gemma.qk_norm and gemma.norm_offset == 1.0
    assert gemma.attn_scale == 24**-0.5 and gemma.embed_scale == 64**0.5 and gemma.final_softcap == 30.0
    assert (gemma.rope_theta, gemma.rope_scaling["factor"], gemma.local_rope_theta, gemma.local_rope_scaling) == (
        5000.0,
        2.0,
        100.0,
        None,
    )
    assert gemma.mlp_act == "gelu_tanh"


def test_qwen_window_off_unless_enabled(hf_checkpoint):
    _, path = hf_checkpoint("qwen2", use_sliding_window=False)
    assert models.ModelArgs.from_json(path / "config.json").layer_windows == (None,) * 3


def test_sharded_checkpoint(hf_checkpoint):
    hf, path = hf_checkpoint("qwen2", shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = models.load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    ref, got = _logits_pair(hf, model, tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_kv_cache_decode_equals_full_forward(hf_checkpoint):
    """Prefill then one-token steps through the cache give the logits of one full pass."""
    _, path = hf_checkpoint("mistral")
    model = models.load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens, torch.arange(40))
        model.setup_cache(1, 40)
        steps = [model(tokens[:, :30], torch.arange(30))]
        for i in range(30, 40):
            steps.append(model(tokens[:, i : i + 1], torch.tensor([i])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral", "gemma3"])
def test_greedy_generation_matches_transformers(family, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = models.load_model(path, dtype=torch.float32)
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = list(generate_tokens(model, prompt[0].tolist(), 20))
    assert got == ref[0, 12:].tolist()


def test_sampling_respects_top_k_and_is_seeded(hf_checkpoint):
    _, path = hf_checkpoint("llama3")
    model = models.load_model(path, dtype=torch.float32)
    prompt = list(range(1, 9))
    s = Sampling(temperature=1.5, top_k=3, seed=7)
    a = list(generate_tokens(model, prompt, 12, s))
    assert a == list(generate_tokens(model, prompt, 12, s))
    assert a != list(generate_tokens(model, prompt, 12, Sampling(temperature=1.5, top_k=3, seed=8)))
    seq = torch.tensor([prompt + a])
    with torch.no_grad():
        full = models.load_model(path, dtype=torch.float32)(seq, torch.arange(seq.shape[1]))[0]
    for i, tok in enumerate(a):  # every sampled token is among the 3 most likely at its step
        assert tok in full[len(prompt) - 1 + i].topk(3).indices.tolist()


def test_draws_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g, n = torch.Generator().manual_seed(0), 4000
    counts = torch.bincount(
        torch.stack([sample(probs.log(), Sampling(temperature=1.0), g) for _ in range(n)]), minlength=4
    )
    assert ((counts / n - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all()  # within 4 standard errors


def test_a_masked_token_is_never_drawn_even_over_zero_noise(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, **kw: self.zero_())
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert int(sample(logits, Sampling(temperature=1.0, top_k=2))) in (1, 3)
    assert int(sample(logits, Sampling(temperature=1.0, top_p=0.5))) == 1


@pytest.mark.parametrize("sampling", [None, Sampling(temperature=1.5, top_k=5, seed=3)])
def test_running_ahead_yields_the_same_tokens(sampling, hf_checkpoint, monkeypatch):
    """The step taking a token is queued before the token is read (the cache holds one more token at each read but
    the first and last), and the tokens, a stop id's end included, are those of reading first."""
    from longctx.models.generate import _Drawn

    _, path = hf_checkpoint("llama3")
    model = models.load_model(path, dtype=torch.float32)
    prompt, n = list(range(1, 9)), 10
    held, read = [], _Drawn.read
    monkeypatch.setattr(_Drawn, "read", lambda self, p: held.append(model.cache.used) or read(self, p))
    want = list(generate_tokens(model, prompt, n, sampling, ahead=False))
    plain, held[:] = held[:], []
    assert list(generate_tokens(model, prompt, n, sampling, ahead=True)) == want
    assert held == plain[:1] + [u + 1 for u in plain[1:-1]] + plain[-1:]
    stop = want[4]
    assert list(generate_tokens(model, prompt, n, sampling, {stop}, ahead=True)) == want[: want.index(stop) + 1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(300)}
    assert seen == {0, 1}


def test_prompt_longer_than_maximum_is_refused(hf_checkpoint):
    _, path = hf_checkpoint("llama3")
    model = models.load_model(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds the maximum context of 512"):
        next(generate_tokens(model, [1] * 500, 20))


# --- bad checkpoints: each a clear error


def _copy(path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def test_missing_directory_and_files(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "nope")
    _, path = hf_checkpoint("llama3")
    ckpt = _copy(path, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.safetensors.index.json"):
        models.load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_model(ckpt)


def test_truncated_safetensors(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama3")
    ckpt = _copy(path, tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        models.load_model(ckpt)


def test_wrong_shape_names_the_tensor(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_checkpoint("llama3")
    ckpt = _copy(path, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \(3, 3\)"):
        models.load_model(ckpt)


def test_missing_and_unknown_tensors(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_checkpoint("llama3")
    ckpt = _copy(path, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(extra, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        models.load_model(ckpt)
    del tensors["model.norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors: norm.weight"):
        models.load_model(ckpt)
    del tensors["model.layers.1.self_attn.k_proj.weight"]  # one part of the fused q/k/v projection
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wqkv\.weight \(part 1\)"):
        models.load_model(ckpt)


def test_fused_projections_hold_each_checkpoint_tensor_in_its_rows(hf_checkpoint):
    from safetensors.torch import load_file

    _, path = hf_checkpoint("qwen2")  # q/k/v biases too
    model = models.load_model(path, dtype=torch.float32)
    tensors = load_file(path / "model.safetensors")
    attn, ffn = model.layers[1].attention, model.layers[1].feed_forward
    assert torch.equal(
        attn.wqkv.weight, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    )
    assert torch.equal(attn.wqkv.bias, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    assert torch.equal(ffn.w13.weight[ffn.w13.rows(1)], tensors["model.layers.1.mlp.up_proj.weight"])


def test_unknown_architecture(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama3")
    ckpt = _copy(path, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        models.load_model(ckpt)


def test_long_inputs_run_the_mlp_in_chunks_with_the_same_result(monkeypatch):
    from longctx.models.config import ModelArgs
    from longctx.models.transformer import FeedForward

    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48)
    torch.manual_seed(0)
    mlp = FeedForward(args)
    x = torch.randn(2, 100, 32)
    whole = mlp(x)
    monkeypatch.setattr(FeedForward, "chunk", 7)  # 15 chunks, the last one short
    torch.testing.assert_close(mlp(x), whole, rtol=1e-6, atol=1e-6)


def test_fused_elementwise_chains_compile_without_graph_breaks():
    """On CUDA these run compiled: a graph break would split a chain into several kernels, so check for none here."""
    from longctx.attention.cache import write_kv, write_kv_quantized
    from longctx.attention.quant import FP8, INT8, dequantize, rotation
    from longctx.models.transformer import add_rms_norm, apply_rotary, gelu_mul, gelu_tanh_mul, rms_norm, silu_mul

    torch._dynamo.reset()
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    q, k, cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    cases = [
        (rms_norm, (x, w, 1e-5)),
        (add_rms_norm, (x, x.flip(0), w, 1e-5)),
        (apply_rotary, (q, k, cos, sin)),
        (silu_mul, (x, x.flip(0))),
        (gelu_tanh_mul, (x, x.flip(0))),
        (gelu_mul, (x, x.flip(0))),
        (rms_norm, (x, w, 1e-6, 1.0)),
        (add_rms_norm, (x, x.flip(0), w, 1e-6, 1.0)),
    ]
    for fn, args in cases:
        traced = torch.compile(fn.__wrapped__, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(traced(*args), fn(*args))
    caches = [torch.zeros(2, 2, 9, 8, dtype=torch.bfloat16) for _ in range(4)]
    slots = torch.tensor([6, 2, 3, 0, 8])
    write_kv(caches[0], caches[1], slots, k, k.flip(0))
    torch.compile(write_kv.__wrapped__, fullgraph=True, backend="aot_eager")(caches[2], caches[3], slots, k, k.flip(0))
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(caches[0][:, :, slots], k.to(torch.bfloat16), rtol=0, atol=0)
    assert caches[0][:, :, [1, 4, 5, 7]].eq(0).all()
    # the one-byte writes (quantize into keys, values and their exponents) are one chain too
    for dtype in (FP8, INT8):
        stores = [[torch.zeros(2, 2, 9, 8, dtype=dtype) for _ in range(2)] + [torch.zeros(2, 2, 9, dtype=torch.int8)
                  for _ in range(2)] for _ in range(2)]  # fmt: skip
        write_kv_quantized(*stores[0], slots, k, k.flip(0))
        traced = torch.compile(write_kv_quantized.__wrapped__, fullgraph=True, backend="aot_eager")
        traced(*stores[1], slots, k, k.flip(0))
        for got, want in zip(stores[1], stores[0]):
            assert torch.equal(got.view(torch.int8), want.view(torch.int8))
        stored = dequantize(stores[0][0][:, :, slots], stores[0][2][:, :, slots], torch.float32)
        rotated = k @ rotation(8) * 8**0.5  # (the stored frame: x @ S, S of +-1 entries)
        # and so is reading a piece back (`attention.kernels` runs it compiled on CUDA), strided as the cache's slices
        piece = (stores[0][0][:, :, 2:7], stores[0][2][:, :, 2:7], torch.bfloat16)
        read = torch.compile(dequantize, fullgraph=True, backend="aot_eager")(*piece)
        assert torch.equal(read.view(torch.int16), dequantize(*piece).view(torch.int16))
        if dtype == FP8:
            torch.testing.assert_close(stored, rotated, rtol=2**-4, atol=1e-5 * rotated.abs().max().item())  # 3 bits
        else:  # half a step, a step at most a 64th of the token's largest value
            assert bool(((stored - rotated).abs() <= rotated.abs().amax(-1, keepdim=True) / 128 + 1e-6).all())


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_column_major_weights_change_memory_not_results(family, hf_checkpoint):
    """Weights re-stored column-major (the layout decode GEMVs read faster on Hopper) keep their values: same logits,
    same cached decode; a weight tied to the embedding table keeps its row-major storage; off CUDA nothing moves."""
    from longctx.models.loading import store_column_major

    _, path = hf_checkpoint(family)
    tokens = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(5))
    base = models.load_model(path, dtype=torch.float32)
    assert all(p.is_contiguous() for p in base.parameters())  # CPU: the default changes nothing
    moved = models.load_model(path, dtype=torch.float32)
    names = ("attention.wo", "feed_forward.w13", "feed_forward.w2", "output")
    store_column_major(moved, names)
    wo = moved.layers[0].attention.wo.weight
    assert wo.t().is_contiguous() and not wo.is_contiguous() and torch.equal(wo, base.layers[0].attention.wo.weight)
    assert moved.layers[0].attention.wqkv.weight.is_contiguous()
    tied = moved.args.tie_embeddings
    assert moved.output.weight.is_contiguous() == tied and moved.tok_embeddings.weight.is_contiguous()
    positions = torch.arange(12)
    with torch.no_grad():
        torch.testing.assert_close(moved(tokens, positions), base(tokens, positions), rtol=1e-5, atol=1e-5)
        for model in (base, moved):
            model.setup_cache(1, 16)
            model(tokens[:, :11], positions[:11])
        torch.testing.assert_close(
            moved(tokens[:, 11:], positions[11:]), base(tokens[:, 11:], positions[11:]), rtol=1e-5, atol=1e-5
        )
