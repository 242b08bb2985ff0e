"""Read a GGUF file (llama.cpp) as Hugging Face tensors, config and tokenizer files.

Tensors are dequantized with the `gguf` package; llama.cpp's row permutation of q/k (applied to the `llama`
architecture only) is undone; `config.json` comes from the GGUF metadata and the byte-level BPE vocabulary
becomes a `tokenizer.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# GGUF tensor name -> Hugging Face name; `{}` is the layer index.
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Pre-tokenizer split patterns by `tokenizer.ggml.pre`; others use GPT-2's byte-level regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFError(ValueError):
    pass


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on damaged files
            raise GGUFError(f"{self.path} cannot be read as GGUF ({type(e).__name__}: {e}); is it truncated or damaged?") from e
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path.name}: GGUF architecture {self.arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )

    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_meta(self, key: str, default: Any = None) -> Any:
        return self.meta(f"{self.arch}.{key}", default)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def config(self) -> dict[str, Any]:
        n_heads = self._arch_meta("attention.head_count")
        hidden = self._arch_meta("embedding_length")
        names = set(self.tensor_names())
        tokens = self.meta("tokenizer.ggml.tokens") or []
        cfg = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self._arch_meta("vocab_size") or len(tokens),
            "hidden_size": hidden,
            "intermediate_size": self._arch_meta("feed_forward_length"),
            "num_hidden_layers": self._arch_meta("block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": self._arch_meta("attention.head_count_kv", n_heads),
            "head_dim": self._arch_meta("attention.key_length", hidden // n_heads),
            "max_position_embeddings": self._arch_meta("context_length"),
            "rms_norm_eps": self._arch_meta("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._arch_meta("rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
        }
        if self._arch_meta("rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": self._arch_meta("rope.scaling.factor")}
        if "rope_freqs.weight" in names:
            cfg["rope_scaling"] = self._llama3_rope_scaling(cfg)
        return cfg

    def _llama3_rope_scaling(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp stores Llama 3.1's rope scaling as per-frequency factors: recover the standard parameters."""
        from models.config import ModelArgs, rope_inv_freq

        stored = torch.from_numpy(self._dequantized("rope_freqs.weight").astype(np.float32))
        scaling = {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
        probe = {**cfg, "rope_scaling": scaling}
        base = rope_inv_freq(ModelArgs.from_hf({**cfg, "rope_scaling": None}))
        scaled = rope_inv_freq(ModelArgs.from_hf(probe))
        if not torch.allclose(base / scaled, stored, rtol=1e-3):
            raise GGUFError(f"{self.path.name}: rope_freqs.weight does not match Llama 3.1's rope scaling; cannot convert")
        return scaling

    def _dequantized(self, name: str) -> np.ndarray:
        from gguf import dequantize

        t = next(t for t in self.reader.tensors if t.name == name)
        try:
            return dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{self.path.name}: tensor {name!r} has quantization {t.tensor_type.name}, which cannot be dequantized") from e

    def hf_name(self, name: str) -> str | None:
        if name == "rope_freqs.weight":
            return None  # folded into config.json's rope_scaling
        if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
            layer, part, kind = m.groups()
            if part in _LAYER:
                return f"model.layers.{layer}.{_LAYER[part]}.{kind}"
        else:
            module, _, kind = name.rpartition(".")
            if module in _TOP:
                return f"{_TOP[module]}.{kind}"
        raise GGUFError(f"{self.path.name}: tensor {name!r} has no Hugging Face counterpart for {self.arch}")

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, fp32 tensor) for every weight, q/k rows back in Hugging Face order."""
        n_heads = self._arch_meta("attention.head_count")
        n_kv = self._arch_meta("attention.head_count_kv", n_heads)
        for t in self.reader.tensors:
            name = self.hf_name(t.name)
            if name is None:
                continue
            w = np.array(self._dequantized(t.name), dtype=np.float32)  # a writable copy
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                w = unpermute_rows(w, n_heads if "q_proj" in name else n_kv)
            yield name, torch.from_numpy(w)

    def tokenizer_files(self) -> dict[str, str]:
        """tokenizer.json and tokenizer_config.json for the GGUF's byte-level BPE vocabulary."""
        model = self.meta("tokenizer.ggml.model")
        if model != "gpt2":
            raise GGUFError(
                f"{self.path.name}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                "convert the original Hugging Face checkpoint instead"
            )
        return build_bpe_tokenizer(
            tokens=list(self.meta("tokenizer.ggml.tokens")),
            token_types=list(self.meta("tokenizer.ggml.token_type") or []),
            merges=list(self.meta("tokenizer.ggml.merges") or []),
            pre=self.meta("tokenizer.ggml.pre", "default"),
            special_ids={k: self.meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")},
            add_bos=bool(self.meta("tokenizer.ggml.add_bos_token", False)),
            chat_template=self.meta("tokenizer.chat_template"),
        )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved rotary pairs -> Hugging Face's half split)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (the inverse of `unpermute_rows`)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_bpe_tokenizer(
    tokens: list[str],
    token_types: list[int],
    merges: list[str],
    pre: str,
    special_ids: dict[str, int | None],
    add_bos: bool,
    chat_template: str | None,
) -> dict[str, str]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]))
    if pattern := _SPLIT_PATTERNS.get(pre):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    types = token_types or [0] * len(tokens)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    tk.add_special_tokens(specials)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    name = {k: tokens[i] for k, i in special_ids.items() if i is not None and 0 <= i < len(tokens)}
    if add_bos and "bos" in name:
        bos = name["bos"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_ids["bos"])]
        )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "bos_token": name.get("bos"),
        "eos_token": name.get("eos"),
        "unk_token": name.get("unknown"),
        "pad_token": name.get("padding"),
    }
    if chat_template:
        config["chat_template"] = chat_template
    return {"tokenizer.json": tk.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
