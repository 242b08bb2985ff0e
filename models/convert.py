"""Checkpoints into the Hugging Face layout the loader reads (config.json + safetensors + tokenizer files): llama.cpp
GGUF, Meta's original release and Hugging Face itself (re-cast, re-sharded). `tools/convert.py` is the command line.

Every target is written beside itself and renamed at the end (models/writer.py); an existing target is refused
without `force`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from longctx.models.config import read_json
from longctx.models.gguf import GGUFCheckpoint
from longctx.models.loading import ST_DTYPES
from longctx.models.writer import write_checkpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


# --- GGUF


def convert_gguf(src: Path, out: Path, dtype: torch.dtype | None = None, **write) -> Path:
    """GGUF -> HF directory. Quantized tensors are dequantized; the default dtype is fp32, which holds them exactly."""
    ckpt = GGUFCheckpoint(src)
    config = ckpt.config()
    files = ckpt.tokenizer_files()
    n = sum(1 for name in ckpt.tensor_names() if name != "rope_freqs.weight")
    dtype = dtype or torch.float32
    size = ckpt.elements() * dtype.itemsize
    return write_checkpoint(out, ckpt.tensors(), config, files, dtype=dtype, total=n, size=size, **write)


# --- Meta's original release


def _load_meta_shards(src: Path) -> list[dict[str, torch.Tensor]]:
    import pickle

    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth in {src}: not a Meta-format checkpoint")
    loaded = []
    for f in shards:
        try:
            loaded.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except pickle.UnpicklingError as e:
            raise ValueError(f"{f.name} is not a weights-only checkpoint and will not be unpickled: {e}") from e
        except RuntimeError as e:
            raise ValueError(f"{f.name} cannot be read as a PyTorch checkpoint ({e}); is it truncated?") from e
    return loaded


# Model-parallel split dimension of each Meta tensor kind (None: replicated).
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}
_META_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def _read_json_object(file: Path) -> dict:
    value = read_json(file)
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object; got {type(value).__name__}")
    return value


def _merge(name: str, parts: list[torch.Tensor], vocab: int | None) -> torch.Tensor:
    if len(parts) == 1 or parts[0].dim() == 1:
        return parts[0]
    if name == "tok_embeddings.weight":  # Llama 2 splits the embedding by columns, Llama 3 by vocabulary rows
        return torch.cat(parts, dim=0 if parts[0].shape[0] != vocab else 1)
    kind = name.split(".")[-2]
    return torch.cat(parts, dim=_META_SPLIT[kind])


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> Hugging Face's half-split layout, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_config(params: dict, vocab_size: int, intermediate: int) -> dict:
    n_heads = params["n_heads"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": params["dim"],
        "intermediate_size": intermediate,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096 if params.get("rope_theta", 10000.0) == 10000.0 else 8192,
    }
    if params.get("use_scaled_rope"):  # Llama 3.1 and later
        cfg["max_position_embeddings"] = 131072
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": params.get("rope_scaling_factor", 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return cfg


def convert_meta(src: Path, out: Path, dtype: torch.dtype | None = None, **write) -> Path:
    params_file = src / "params.json"
    if not params_file.is_file():
        raise FileNotFoundError(f"{params_file} not found: a Meta-format checkpoint needs params.json")
    files = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    if "tokenizer.model" not in files:
        raise FileNotFoundError(f"{src / 'tokenizer.model'} not found: the Meta release ships one beside the weights")
    params = _read_json_object(params_file)
    missing_keys = [k for k in ("dim", "n_layers", "n_heads") if not isinstance(params.get(k), int)]
    if missing_keys:
        raise ValueError(f"{params_file} lacks {', '.join(missing_keys)} (whole numbers); is it Meta's params.json?")
    shards = _load_meta_shards(src)
    names = list(shards[0])
    for i, shard in enumerate(shards[1:], 1):
        if set(shard) != set(names):
            raise ValueError(f"consolidated shard {i} holds other tensors than shard 0")
    expected = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    expected += [f"layers.{i}.{m}.weight" for i in range(params["n_layers"]) for m in _META_NAMES]
    absent = [n for n in expected if n not in shards[0]]
    if absent:
        raise ValueError(
            f"the consolidated.*.pth files in {src} lack {len(absent)} tensors of a {params['n_layers']}-layer "
            f"model, e.g. {', '.join(absent[:3])}; is the download complete?"
        )
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:
        vocab = shards[0]["output.weight"].shape[0] * len(shards)
    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    w1 = _merge("layers.0.feed_forward.w1.weight", [s["layers.0.feed_forward.w1.weight"] for s in shards], vocab)
    config = meta_config(params, vocab, w1.shape[0])

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            if name.endswith("rope.freqs"):
                continue
            w = _merge(name, [s[name] for s in shards], vocab)
            if name == "tok_embeddings.weight":
                yield "model.embed_tokens.weight", w
            elif name == "norm.weight":
                yield "model.norm.weight", w
            elif name == "output.weight":
                yield "lm_head.weight", w
            else:
                _, layer, *module, kind = name.split(".")
                module = ".".join(module)
                if module not in _META_NAMES:
                    raise ValueError(f"unknown tensor {name!r} in the Meta checkpoint")
                if module == "attention.wq":
                    w = permute_to_hf(w, n_heads)
                elif module == "attention.wk":
                    w = permute_to_hf(w, n_kv)
                yield f"model.layers.{layer}.{_META_NAMES[module]}.{kind}", w

    size = sum(
        s[n].numel() * (dtype or s[n].dtype).itemsize for s in shards for n in names if not n.endswith("rope.freqs")
    )
    return write_checkpoint(out, tensors(), config, files, dtype=dtype, total=len(names), size=size, **write)


# --- Hugging Face -> Hugging Face (dtype, sharding)


def convert_hf(src: Path, out: Path, dtype: torch.dtype | None = None, **write) -> Path:
    from safetensors import safe_open

    from longctx.models.loading import checkpoint_files

    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    config = _read_json_object(config_file)
    files = checkpoint_files(src)
    size = 0
    for file in files:  # a truncated or foreign file is found before anything is written
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    stored = ST_DTYPES.get(piece.get_dtype(), torch.float32)
                    size += math.prod(piece.get_shape()) * (dtype or stored).itemsize
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download it") from None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    try:
                        yield name, f.get_tensor(name)
                    except Exception as e:
                        raise ValueError(
                            f"{file}: tensor {name!r} cannot be read ({e}); is the file truncated?"
                        ) from None

    extra = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    return write_checkpoint(out, tensors(), config, extra, dtype=dtype, size=size, **write)
