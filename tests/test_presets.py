"""Model presets have the real shapes of the checkpoints they name."""

from __future__ import annotations

import pytest
import torch
import yaml

import models
from models.transformer import Transformer
from tests.conftest import REPO

# Parameter counts published with each checkpoint (safetensors metadata on the model cards).
PUBLISHED = {
    "llama3": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama2": 6_738_415_616,
    "mistral": 7_241_732_096,
    "qwen2_5": 7_615_616_512,
    "qwen3": 8_190_735_360,
    "smollm2": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_match_published_parameter_counts(name):
    preset = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    assert preset["name"] == name
    args = models.ModelArgs.from_hf(preset["config"])
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_preset_features():
    load = lambda n: models.ModelArgs.from_hf(yaml.safe_load((REPO / "conf/model" / f"{n}.yaml").read_text())["config"])  # noqa: E731
    assert load("llama3").rope_scaling["rope_type"] == "llama3" and load("llama3").max_seq_len == 131072
    assert load("mistral").layer_windows == (4096,) * 32
    assert load("qwen2_5").qkv_bias and load("qwen2_5").layer_windows == (None,) * 28
    assert load("qwen3").qk_norm and load("smollm2").tie_embeddings


