"""Read a GGUF file (llama.cpp) as Hugging Face tensors, config and tokenizer files.

Tensors are dequantized with the `gguf` package; llama.cpp's row permutation of q/k (applied to the `llama`
architecture only) is undone; `config.json` comes from the GGUF metadata. A byte-level BPE vocabulary (`gpt2`)
becomes a `tokenizer.json`; a SentencePiece vocabulary (`llama`: Llama 2, Mistral, Gemma) becomes the
`tokenizer.model` those checkpoints ship, rebuilt from the pieces, scores and types.

Gemma's norm weights: Hugging Face checkpoints store w of x * (1 + w); llama.cpp's converter stores 1 + w (it adds
one to every tensor whose name ends in `norm.weight`, q/k norms included, so that its kernels multiply by the
stored weight). `tensors` subtracts the one again, as transformers' own GGUF reader does;
tests/test_gemma3.py checks the converted Gemma 3 270M against transformers' reading of the same GGUF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from longctx.models import rope

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}  # fmt: skip
# GGUF tensor name -> Hugging Face name; `{}` is the layer index.
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
# Gemma 3's four norms per block: llama.cpp's ffn_norm is the norm in front of the MLP.
_GEMMA3_LAYER = _LAYER | {
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}  # fmt: skip
# Phi-3 keeps Hugging Face's fused projections: q, k and v in one tensor, gate and up in another.
_PHI3_LAYER = _LAYER | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_LAYER_NAMES = {"gemma3": _GEMMA3_LAYER, "phi3": _PHI3_LAYER}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp stores for the rope: folded into config.json's rope scaling.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Pre-tokenizer split patterns by `tokenizer.ggml.pre`; others use GPT-2's byte-level regex.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),
}
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = (
    2,
    3,
    4,
    6,
)  # llama.cpp token types (SentencePiece's piece types use the same numbers)
# Gemma 3 hyperparameters that llama.cpp does not store but fixes in its code: every 6th layer attends fully, the
# sliding-window layers use rope base 10,000, queries are scaled by head_dim**-0.5 (27B, the one 62-layer model:
# (hidden / heads)**-0.5).
_GEMMA3_PATTERN, _GEMMA3_LOCAL_ROPE, _GEMMA3_27B_LAYERS = 6, 10_000.0, 62


class GGUFError(ValueError):
    pass


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a directory; name the .gguf file in it")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on damaged files
            raise GGUFError(
                f"{self.path} cannot be read as GGUF ({type(e).__name__}: {e}); is it truncated or damaged?"
            ) from e
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

    def elements(self) -> int:
        """Elements of every tensor that `tensors` yields."""
        return sum(int(t.n_elements) for t in self.reader.tensors if self.hf_name(t.name) is not None)

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
        dims = self._arch_meta("rope.dimension_count")
        if dims and dims != cfg["head_dim"]:  # Phi-4-mini turns only part of each head
            cfg["partial_rotary_factor"] = dims / cfg["head_dim"]
        if window := self._arch_meta("attention.sliding_window"):
            cfg["sliding_window"] = window
        if scaling := self._rope_scaling(cfg, names):
            cfg["rope_scaling"] = scaling
            if self.arch == "phi3":  # Phi-3 configs keep their original context at the top level (default: 4096)
                cfg["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        if self.arch == "gemma3":
            cfg.update(self._gemma3_config(cfg))
        return cfg

    def _rope_scaling(self, cfg: dict[str, Any], names: set[str]) -> dict[str, Any] | None:
        """The rope scaling block of config.json from llama.cpp's `rope.scaling.*` keys and rope tensors."""
        key = f"{self.arch}.rope.scaling.type"
        kind = self.meta(key)
        if "rope_factors_long.weight" in names:
            kind = "longrope"
        elif "rope_freqs.weight" in names:
            return self._llama3_rope_scaling(cfg)
        if kind in (None, "none"):
            return None
        original = self._arch_meta("rope.scaling.original_context_length")
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._arch_meta("rope.scaling.factor")}
        if kind == "yarn":
            if self._arch_meta("rope.scaling.yarn_log_multiplier"):
                raise GGUFError(
                    f"{self.path.name}: {self.arch}.rope.scaling.yarn_log_multiplier (DeepSeek's YaRN) is not "
                    f"understood for {self.arch}; convert the original Hugging Face checkpoint instead"
                )
            optional = {
                "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow", "attention_factor": "yarn_attn_factor",
            }  # fmt: skip
            scaling = {"rope_type": "yarn", "factor": self._arch_meta("rope.scaling.factor")}
            scaling["original_max_position_embeddings"] = original
            for ours, theirs in optional.items():
                if (value := self._arch_meta(f"rope.scaling.{theirs}")) is not None:
                    scaling[ours] = value
            return scaling
        if kind == "longrope":
            if not {"rope_factors_long.weight", "rope_factors_short.weight"} <= names:
                raise GGUFError(
                    f"{self.path.name}: {key} is longrope but the rope_factors_long / rope_factors_short tensors "
                    "are missing"
                )
            scaling = {"rope_type": "longrope", "original_max_position_embeddings": original}
            for which in ("long", "short"):
                scaling[f"{which}_factor"] = self._dequantized(f"rope_factors_{which}.weight").astype(float).tolist()
            if (factor := self._arch_meta("rope.scaling.attn_factor")) is not None:
                scaling["attention_factor"] = factor
            return scaling
        raise GGUFError(
            f"{self.path.name}: {key}={kind!r} is not understood (understood: none, linear, yarn, longrope); "
            "convert the original Hugging Face checkpoint instead"
        )

    def _gemma3_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        n_layers = cfg["num_hidden_layers"]
        pattern = self._arch_meta("attention.sliding_window_pattern", _GEMMA3_PATTERN)
        if not isinstance(pattern, int):  # newer GGUFs may store a per-layer list of booleans (True: sliding)
            layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == _GEMMA3_27B_LAYERS else cfg["head_dim"]
        return {
            "model_type": "gemma3_text",
            "sliding_window": self._arch_meta("attention.sliding_window"),
            "layer_types": layer_types,
            "rope_local_base_freq": _GEMMA3_LOCAL_ROPE,
            "query_pre_attn_scalar": scalar,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": self._arch_meta("final_logit_softcapping"),
            "attn_logit_softcapping": None,
            "pad_token_id": self.meta("tokenizer.ggml.padding_token_id"),
        }

    def _llama3_rope_scaling(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp stores Llama 3.1's rope scaling as per-frequency factors: recover the standard parameters."""
        stored = torch.from_numpy(self._dequantized("rope_freqs.weight").astype(np.float32))
        scaling = {
            "rope_type": "llama3",
            "factor": float(stored.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        theta, dim = cfg["rope_theta"], cfg["head_dim"]
        base, scaled = rope.inv_freq(theta, None, dim), rope.inv_freq(theta, scaling, dim)
        if not torch.allclose(base / scaled, stored, rtol=1e-3):
            raise GGUFError(
                f"{self.path.name}: rope_freqs.weight does not match Llama 3.1's rope scaling; cannot convert"
            )
        return scaling

    def _dequantized(self, name: str) -> np.ndarray:
        from gguf import dequantize

        t = next(t for t in self.reader.tensors if t.name == name)
        try:
            return dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(
                f"{self.path.name}: tensor {name!r} has quantization {t.tensor_type.name}, which cannot be dequantized"
            ) from e

    def hf_name(self, name: str) -> str | None:
        if name in _ROPE_TENSORS:
            return None  # folded into config.json's rope_scaling
        if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
            layer, part, kind = m.groups()
            names = _LAYER_NAMES.get(self.arch, _LAYER)
            if part in names:
                return f"model.layers.{layer}.{names[part]}.{kind}"
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
            if self.arch == "gemma3" and name.endswith("norm.weight"):
                w -= 1.0  # stored as 1 + w (module docstring)
            yield name, torch.from_numpy(w)

    def tokenizer_files(self) -> dict[str, str | bytes]:
        """The tokenizer files for the GGUF's vocabulary: byte-level BPE (`gpt2`) or SentencePiece (`llama`)."""
        model = self.meta("tokenizer.ggml.model")
        special_ids = {k: self.meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
        if model == "llama":
            return build_spm_tokenizer(
                tokens=list(self.meta("tokenizer.ggml.tokens")),
                scores=list(self.meta("tokenizer.ggml.scores") or []),
                token_types=list(self.meta("tokenizer.ggml.token_type") or []),
                special_ids=special_ids,
                add_bos=bool(self.meta("tokenizer.ggml.add_bos_token", True)),
                add_eos=bool(self.meta("tokenizer.ggml.add_eos_token", False)),
                add_space_prefix=bool(self.meta("tokenizer.ggml.add_space_prefix", True)),
                chat_template=self.meta("tokenizer.chat_template"),
                tokenizer_class="GemmaTokenizer" if self.arch == "gemma3" else "LlamaTokenizer",
            )
        if model != "gpt2":
            raise GGUFError(
                f"{self.path.name}: tokenizer model {model!r} is not supported (supported: 'gpt2', byte-level BPE; "
                "'llama', SentencePiece); convert the original Hugging Face checkpoint instead"
            )
        return build_bpe_tokenizer(
            tokens=list(self.meta("tokenizer.ggml.tokens")),
            token_types=list(self.meta("tokenizer.ggml.token_type") or []),
            merges=list(self.meta("tokenizer.ggml.merges") or []),
            pre=self.meta("tokenizer.ggml.pre", "default"),
            special_ids=special_ids,
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

    tk = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    )
    if pattern := _SPLIT_PATTERNS.get(pre):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    types = token_types or [0] * len(tokens)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    tk.add_special_tokens(specials)
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
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


def build_spm_tokenizer(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    special_ids: dict[str, int | None],
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    chat_template: str | None,
    tokenizer_class: str,
) -> dict[str, str | bytes]:
    """A SentencePiece `tokenizer.model` (BPE, with byte fallback where the vocabulary has byte pieces) holding the
    GGUF's pieces, scores and types, and its `tokenizer_config.json`.

    llama.cpp's SentencePiece tokenizer and SentencePiece's BPE both merge the adjacent pair whose merged piece
    scores highest, so the same pieces and scores give the same tokens. The normalizer is SentencePiece's
    `identity`, with the dummy "▁" prefix where the GGUF asks for one (Llama 2, Mistral; not Gemma).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if not tokens:
        raise GGUFError("the GGUF's SentencePiece vocabulary (tokenizer.ggml.tokens) is empty")
    scores = scores or [0.0] * len(tokens)
    types = token_types or [1] * len(tokens)
    if not len(scores) == len(types) == len(tokens):
        raise GGUFError(f"the GGUF has {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types")
    if set(types) - {1, 2, 3, 4, 5, 6}:
        raise GGUFError(f"unknown SentencePiece token types {sorted(set(types) - {1, 2, 3, 4, 5, 6})} in the GGUF")
    types = list(types)
    unk = special_ids.get("unknown")
    if unk is not None and 0 <= unk < len(tokens):
        types[unk] = _UNKNOWN  # llama.cpp may mark it as a control token; SentencePiece needs one unknown piece
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        if kind == _USER_DEFINED:  # llama.cpp matches these in the raw text; SentencePiece after escaping spaces
            piece = piece.replace(" ", "▁")
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE in types
    # SentencePiece finds its special tokens by their pieces' text (the *_piece fields), not by the *_id fields.
    for key, field in (("unknown", "unk"), ("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = special_ids.get(key)
        known = i is not None and 0 <= i < len(tokens)
        setattr(trainer, f"{field}_id", i if known else -1)
        if known:
            setattr(trainer, f"{field}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    name = {k: tokens[i] for k, i in special_ids.items() if i is not None and 0 <= i < len(tokens)}
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name.get("bos"),
        "eos_token": name.get("eos"),
        "unk_token": name.get("unknown"),
        "pad_token": name.get("padding"),
        "legacy": False,
        "add_prefix_space": add_space_prefix,  # transformers' LlamaTokenizer does not read it from the model
    }
    if chat_template:
        config["chat_template"] = chat_template
    return {"tokenizer.model": proto.SerializeToString(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
