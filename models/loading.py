"""Build a model from a Hugging Face checkpoint directory (or random weights of a config's shape).

The model is built on the meta device and each checkpoint tensor is read from its memory-mapped safetensors
file, cast and placed straight into the module: no second full copy of the weights exists at any time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from attention import AttentionStrategy
from models.config import ModelArgs
from models.transformer import Transformer

# Hugging Face tensor name -> ours; `{}` is the layer index.
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name, or None if the name is not a model weight."""
    if m := _LAYER_RE.fullmatch(name):
        layer, module, kind = m.groups()
        return f"layers.{layer}.{_LAYER_NAMES[module]}.{kind}" if module in _LAYER_NAMES else None
    module, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[module]}.{kind}" if module in _TOP_NAMES else None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, single-file or sharded."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [path / n for n in names]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
        "(convert other formats with `python tools/convert.py`)"
    )


def load_weights(model: Transformer, path: Path, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill a (meta-device) model with the checkpoint's tensors, checking each is known, unique and well shaped."""
    params = dict(model.named_parameters())
    loaded: dict[str, str] = {}
    files = checkpoint_files(path)
    with tqdm(desc="loading weights", unit="tensor", disable=None) as bar:
        for file in files:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download or re-convert it") from e
            with handle as f:
                for hf_name in f.keys():
                    if _IGNORED_RE.fullmatch(hf_name):
                        continue
                    name = hf_to_ours(hf_name)
                    if name == "output.weight" and model.args.tie_embeddings:
                        continue  # tied: the embedding serves as the output projection
                    if name not in params:
                        raise ValueError(f"{file.name}: tensor {hf_name!r} is not used by a {model.args.architecture}")
                    if name in loaded:
                        raise ValueError(f"tensor {hf_name!r} appears twice: in {loaded[name]} and {file.name}")
                    param = params[name]
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    if shape != tuple(param.shape):
                        raise ValueError(
                            f"{file.name}: tensor {hf_name!r} has shape {shape}, the config implies "
                            f"{tuple(param.shape)}; does config.json belong to these weights?"
                        )
                    try:
                        tensor = f.get_tensor(hf_name)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"{file.name}: tensor {hf_name!r} cannot be read ({e}); is the file truncated?") from e
                    _set_param(model, name, tensor.to(device=device, dtype=dtype))
                    loaded[name] = file.name
                    bar.update()
    missing = [n for n in params if n not in loaded and not (n == "output.weight" and model.args.tie_embeddings)]
    if missing:
        raise ValueError(f"checkpoint in {path} lacks tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    model.tie_weights()


def _set_param(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: AttentionStrategy | None = None,
) -> Transformer:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    args = ModelArgs.from_json(path / "config.json")
    with torch.device("meta"):
        model = Transformer(args, attention)
    load_weights(model, path, dtype, device)
    model.init_buffers(device)
    return model.eval()


def random_model(
    args: ModelArgs,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: AttentionStrategy | None = None,
    seed: int = 0,
) -> Transformer:
    """A model of `args`' shape with random weights (std 0.02), for benchmarks and tests."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args, attention)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    model.to(dtype).eval().requires_grad_(False)
    model.init_buffers(device)  # keep the rotary frequencies in fp32
    return model
