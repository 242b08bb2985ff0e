"""Build a model from a Hugging Face checkpoint directory (or random weights of a config's shape).

The model is built on the meta device and each checkpoint tensor is read from its memory-mapped safetensors
file, cast and placed straight into the module: no second full copy of the weights exists at any time.
"""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from longctx.attention import AttentionStrategy
from longctx.models.config import ModelArgs
from longctx.models.transformer import Transformer


class Slicing(Protocol):
    """Which slice of each weight a rank keeps, and the rewrite of a built model to hold only those
    (`parallel.tensor.TensorParallel`: tensor parallelism is applied from outside the model)."""

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def index(self, name: str, part: int | None) -> tuple[slice, ...]: ...

    def take(self, name: str, whole: torch.Tensor, splits: tuple[int, ...] | None = None) -> torch.Tensor: ...


# Hugging Face module -> ours, and which part of a fused projection (`FusedLinear`) it is.
_LAYER_NAMES = {
    "self_attn.q_proj": ("attention.wqkv", 0),
    "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2),
    "self_attn.o_proj": ("attention.wo", None),
    "self_attn.q_norm": ("attention.q_norm", None),
    "self_attn.k_norm": ("attention.k_norm", None),
    "mlp.gate_proj": ("feed_forward.w13", 0),
    "mlp.up_proj": ("feed_forward.w13", 1),
    "mlp.down_proj": ("feed_forward.w2", None),
    "input_layernorm": ("attention_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    # Phi-3 checkpoints store the projections fused already: one tensor fills several parts.
    "self_attn.qkv_proj": ("attention.wqkv", (0, 1, 2)),
    "mlp.gate_up_proj": ("feed_forward.w13", (0, 1)),
}
# Gemma's blocks have four norms: its post_attention_layernorm norms the attention output, and the norm in front of
# the MLP (Llama's post_attention_layernorm) is pre_feedforward_layernorm.
_SANDWICH_NAMES = _LAYER_NAMES | {
    "post_attention_layernorm": ("attention_post_norm", None),
    "pre_feedforward_layernorm": ("ffn_norm", None),
    "post_feedforward_layernorm": ("ffn_post_norm", None),
}
# Where text models nested in a multimodal checkpoint keep their tensors (transformers 5, 4.x).
_NESTED_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")


Part = int | tuple[int, ...] | None


def hf_to_ours(name: str, sandwich_norms: bool = False) -> tuple[str, Part] | None:
    """Our parameter name for a Hugging Face tensor name and, for a fused projection, the part (or the run of parts)
    it fills; None if the name is not a model weight. `sandwich_norms`: the model has Gemma's four norms per block."""
    for prefix, plain in _NESTED_PREFIXES.items():
        if name.startswith(prefix):
            name = plain + name.removeprefix(prefix)
    if m := _LAYER_RE.fullmatch(name):
        layer, module, kind = m.groups()
        names = _SANDWICH_NAMES if sandwich_norms else _LAYER_NAMES
        if module not in names:
            return None
        ours, part = names[module]
        return f"layers.{layer}.{ours}.{kind}", part
    module, _, kind = name.rpartition(".")
    return (f"{_TOP_NAMES[module]}.{kind}", None) if module in _TOP_NAMES else None


def fused_rows(model: torch.nn.Module, name: str, part: Part) -> slice:
    """Rows of parameter `name` that a checkpoint tensor fills: all of them, or one part (or a run of parts) of a
    fused projection."""
    if part is None:
        return slice(None)
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(part, tuple):
        return slice(module.rows(part[0]).start, module.rows(part[-1]).stop)
    return module.rows(part)


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


# safetensors dtype names (https://github.com/huggingface/safetensors, the format's header) -> torch.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # fmt: skip


class MappedSafetensors:
    """The tensors of a safetensors file (already validated by `safe_open`) as views of its memory map.

    safetensors' own `get_slice` on the torch side reads the whole tensor before slicing it; a view of the map
    costs no memory, and copying a slice of it out touches only the pages the slice lies on (file cache, not the
    process's own memory). The map is private (copy-on-write), so a view can never write the file.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        n = int.from_bytes(self.map[:8], "little")
        self.header = json.loads(self.map[8 : 8 + n])
        self.start = 8 + n

    def view(self, name: str) -> torch.Tensor:
        meta = self.header[name]
        dtype, (begin, end) = ST_DTYPES[meta["dtype"]], meta["data_offsets"]
        if end == begin:
            return torch.empty(meta["shape"], dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.start + begin)
        return flat.view(meta["shape"])

    def __enter__(self) -> "MappedSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.map.close()
        except BufferError:  # a view still alive (an error mid-load): the map goes when it does
            pass


def load_weights(
    model: Transformer, path: Path, dtype: torch.dtype, device: torch.device | str, tp: Slicing | None = None
) -> None:
    """Fill a meta-device model of the whole shape with the checkpoint's tensors, checking each is known, unique and
    well shaped. With `tp`, the model is first rewritten to that rank's slices and only they are copied out of the
    files (`MappedSafetensors`): no rank holds the whole model, or even a whole tensor it slices, at any time."""
    params = dict(model.named_parameters())
    rows_of = {(n, p): fused_rows(model, n, p) for n in params for p in _parts(model, n)}  # of the whole model
    whole = {(n, p): tuple(params[n][rows].shape) for (n, p), rows in rows_of.items()}
    if tp is not None:
        tp.parallelize(model)
        params = dict(model.named_parameters())
    loaded: dict[str, str] = {}
    files = checkpoint_files(path)
    with tqdm(desc="loading weights", unit="tensor", disable=None) as bar:
        for file in files:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(
                    f"{file} is not a readable safetensors file ({e}); re-download or re-convert it"
                ) from e
            with handle as f, MappedSafetensors(file) as mapped:
                for hf_name in f.keys():
                    if _IGNORED_RE.fullmatch(hf_name):
                        continue
                    name, fused = hf_to_ours(hf_name, model.args.sandwich_norms) or (None, None)
                    if name == "output.weight" and model.args.tie_embeddings:
                        continue  # tied: the embedding serves as the output projection
                    if name not in params:
                        raise ValueError(f"{file.name}: tensor {hf_name!r} is not used by a {model.args.architecture}")
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    expected = (
                        (sum(whole[name, p][0] for p in fused), *whole[name, fused[0]][1:])
                        if isinstance(fused, tuple)
                        else whole[name, fused]
                    )
                    if shape != expected:
                        raise ValueError(
                            f"{file.name}: tensor {hf_name!r} has shape {shape}, the config implies "
                            f"{expected}; does config.json belong to these weights?"
                        )
                    start = rows_of[name, fused[0] if isinstance(fused, tuple) else fused].start or 0
                    for part in fused if isinstance(fused, tuple) else (fused,):
                        if (name, part) in loaded:
                            raise ValueError(
                                f"tensor {hf_name!r} appears twice: in {loaded[name, part]} and {file.name}"
                            )
                        span = rows_of[name, part]  # this part's rows in the checkpoint tensor
                        own = slice(span.start - start, span.stop - start) if part is not None else slice(None)
                        rows = fused_rows(model, name, part)  # ... and in this rank's parameter
                        try:
                            tensor = mapped.view(hf_name)[own][tp.index(name, part) if tp is not None else ()]
                        except (KeyError, ValueError, RuntimeError) as e:
                            raise ValueError(
                                f"{file.name}: tensor {hf_name!r} cannot be read ({e}); is the file truncated?"
                            ) from e
                        _check_finite(tensor, file, hf_name)
                        if part is None:  # (a copy of its own: never a view of the file's map)
                            _set_param(model, name, tensor.to(device=device, dtype=dtype, copy=True))
                        else:  # one part of a fused weight: allocate the whole on its first part, then fill rows
                            if model.get_parameter(name).is_meta:
                                _set_param(model, name, torch.empty(params[name].shape, device=device, dtype=dtype))
                            model.get_parameter(name).data[rows] = tensor
                        loaded[name, part] = file.name
                    bar.update()
    expected = [(n, p) for n, p in whole if not (n == "output.weight" and model.args.tie_embeddings)]
    missing = [n if p is None else f"{n} (part {p})" for n, p in expected if (n, p) not in loaded]
    if missing:
        raise ValueError(
            f"checkpoint in {path} lacks tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    model.tie_weights()


def _check_finite(tensor: torch.Tensor, file: Path, hf_name: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{file}: tensor {hf_name!r} holds NaN or infinite values; the file is corrupt: re-download or re-convert it"
        )


def _parts(model: torch.nn.Module, name: str) -> list[int | None]:
    splits = getattr(model.get_submodule(name.rpartition(".")[0]), "splits", None)
    return list(range(len(splits))) if splits else [None]


def _set_param(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


# Projections whose weights are stored column-major (input features contiguous) on a GPU of this capability, so
# that F.linear runs cuBLAS's NN GEMM: BENCHMARKS.md, figure `gemv` (batch-1 decode reads these faster that way on
# an H100; wqkv does not).
COLUMN_MAJOR: dict[tuple[int, int], tuple[str, ...]] = {
    (9, 0): ("attention.wo", "feed_forward.w13", "feed_forward.w2", "output")
}


def store_column_major(model: Transformer, modules: tuple[str, ...] | None = None) -> None:
    """Re-store the weights of `modules` (suffixes of module names; default: this GPU's `COLUMN_MAJOR`, none off
    CUDA or outside 16-bit dtypes) column-major: same shape and values, transposed memory. A weight shared with
    another module (tied embeddings) stays as it is. One weight is copied at a time."""
    weight = model.tok_embeddings.weight
    if modules is None:
        cuda_16bit = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
        modules = COLUMN_MAJOR.get(torch.cuda.get_device_capability(weight.device), ()) if cuda_16bit else ()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name.endswith(modules) and w is not None and w.dim() == 2 and w is not weight and w.is_contiguous():
            module.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=False)


def check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16; got {dtype!r}")


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: AttentionStrategy | None = None,
    tp: Slicing | None = None,
    overrides: dict[str, Any] | None = None,
) -> Transformer:
    """The checkpoint's model; with `tp`, only that tensor-parallel rank's slices of it (parallel/tensor.py);
    `overrides`: config.json keys set over the checkpoint's (`ModelArgs.from_json`)."""
    path = Path(path)
    check_dtype(dtype)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {path} is not a directory"
            if path.exists()
            else f"checkpoint directory {path} does not exist"
        )
    args = ModelArgs.from_json(path / "config.json", overrides)
    with torch.device("meta"):
        model = Transformer(args, attention)
    load_weights(model, path, dtype, device, tp)
    store_column_major(model)
    model.init_buffers(device)
    return model.eval()


def random_model(
    args: ModelArgs,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: AttentionStrategy | None = None,
    seed: int = 0,
    tp: Slicing | None = None,
) -> Transformer:
    """A model of `args`' shape with random weights (std 0.02; norms the identity, biases 0), for benchmarks and tests.

    Each weight is drawn whole, in order, from one seeded generator on `device`, then cast (and, with `tp`, cut to
    the rank's slice): the same seed gives the same model on any number of tensor-parallel ranks, and no more than
    one whole weight exists beyond the model at any time.
    """
    check_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(args, attention)
    wholes = [
        (name, p.shape, getattr(model.get_submodule(name.rpartition(".")[0]), "splits", None))
        for name, p in model.named_parameters()
    ]
    if tp is not None:
        tp.parallelize(model)
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape, splits in wholes:
        module = model.get_submodule(name.rpartition(".")[0])
        if name.endswith("norm.weight"):
            whole = torch.full(shape, 1.0 - module.offset, device=device)
        elif len(shape) > 1:
            whole = torch.randn(shape, generator=gen, device=device).mul_(0.02)
        else:
            whole = torch.zeros(shape, device=device)
        whole = whole.to(dtype)
        _set_param(model, name, tp.take(name, whole, splits) if tp is not None else whole)
    model.tie_weights()
    store_column_major(model)
    model.init_buffers(device)  # keep the rotary frequencies in fp32
    return model.eval()
