"""Our tokenizers against `transformers` reading the same files, for each tokenizer format."""

from __future__ import annotations

import base64
import collections
import json

import pytest

from longctx import models
from longctx.models.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL
from tests.helpers import CHAT, SAMPLES, corpus, train_sentencepiece


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A Llama-2-style sentencepiece BPE model (byte fallback) trained here, with a Llama-2-style chat template."""
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(d, 600)
    (d / "tokenizer.vocab").unlink()
    template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}"
        "{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _train_byte_bpe(text: str, n_merges: int) -> list[bytes]:
    """Byte-level BPE merges learned on `text`, in rank order (all 256 bytes first)."""
    import regex

    words = collections.Counter(regex.findall(LLAMA3_PATTERN, text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, count in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                pairs[pair] += count
        (a, b), _ = pairs.most_common(1)[0]
        vocab.append(a + b)
        for w, s in seqs.items():
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            seqs[w] = merged
    return vocab


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    """A tokenizer.model in the tiktoken format of Meta's Llama 3 release, with its special tokens."""
    d = tmp_path_factory.mktemp("tiktoken")
    vocab = _train_byte_bpe(corpus(), 300)
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(vocab)))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "extra_special_tokens": LLAMA3_SPECIAL,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _hf_chat_ids(hf, messages):
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return ids if isinstance(ids, list) else ids["input_ids"]


def test_sentencepiece_matches_transformers(sentencepiece_dir):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(sentencepiece_dir), models.Tokenizer.from_dir(sentencepiece_dir)
    assert type(ours).__name__ == "SentencePieceTokenizer"
    for text in [*SAMPLES, "a<s>b</s> c"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1  # BOS
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(CHAT) == _hf_chat_ids(hf, CHAT)


def test_tiktoken_matches_transformers(tiktoken_dir):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(tiktoken_dir), models.Tokenizer.from_dir(tiktoken_dir)
    assert type(ours).__name__ == "TiktokenTokenizer"
    for text in [*SAMPLES, "a<|begin_of_text|>b<|eot_id|> c"]:
        # transformers' tiktoken conversion adds no BOS; Meta's tokenizer (and ours) does.
        assert ours.encode(text) == [ours.bos_id, *hf.encode(text)]
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids) == text
    bos, eot = LLAMA3_SPECIAL.index("<|begin_of_text|>"), LLAMA3_SPECIAL.index("<|eot_id|>")
    assert (ours.bos_id, ours.eos_id) == (556 + bos, 556 + eot)
    rendered = ours.apply_chat_template(CHAT)  # Llama 3's built-in template
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ours.encode_chat(CHAT) == hf.encode(rendered, add_special_tokens=False)


def test_tokenizer_json_matches_transformers(smollm2_dir, smollm2_reference):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(smollm2_dir), models.Tokenizer.from_dir(smollm2_dir)
    gguf_tok = smollm2_reference[1]
    assert type(ours).__name__ == "HFTokenizer"
    for text in [*SAMPLES, corpus()[:3000]]:
        ids = ours.encode(text)
        assert ids == hf.encode(text) == gguf_tok.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
    expected = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT) == expected
    assert ours.apply_chat_template(CHAT[1:]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert ours.encode_chat(CHAT) == _hf_chat_ids(hf, CHAT)
    assert ours.eos_id == hf.eos_token_id


def test_missing_tokenizer_and_template(tmp_path, sentencepiece_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        models.Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((sentencepiece_dir / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="no chat template"):
        models.Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT)


def test_template_can_raise(tmp_path, sentencepiece_dir):
    (tmp_path / "tokenizer.model").write_bytes((sentencepiece_dir / "tokenizer.model").read_bytes())
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(ValueError, match="first message must be user"):
        models.Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT)
