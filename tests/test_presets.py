"""Model presets have the real shapes of the checkpoints they name."""

from __future__ import annotations

import pytest
import torch
import yaml

from longctx import models
from longctx.models.transformer import Transformer
from tests.helpers import REPO

# Parameter counts published with each checkpoint (safetensors metadata on the model cards).
PUBLISHED = {
    "llama3": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama2": 6_738_415_616,
    "mistral": 7_241_732_096,
    "qwen2_5": 7_615_616_512,
    "qwen3": 8_190_735_360,
    "smollm2": 134_515_008,
    "gemma3_270m": 268_098_176,
    "qwen2_5_128k": 7_615_616_512,
    "qwen3_128k": 8_190_735_360,
    "phi3_5_mini": 3_821_079_552,
    "mistral_nemo": 12_247_782_400,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}
# Gemma 3's technical report (Table 1) gives the text models' embedding and non-embedding parameters in millions
# (the released 4B/12B/27B checkpoints also hold a 417M vision tower, so their totals do not apply).
GEMMA3_REPORT = {"gemma3_4b": (675, 3_209), "gemma3_12b": (1_012, 10_759), "gemma3_27b": (1_416, 25_600)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_match_published_parameter_counts(name):
    preset = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    assert preset["name"] == name
    args = models.ModelArgs.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_long_context_presets_run_at_their_context_with_their_scaling():
    """README's model table: each preset's positions and rope scaling."""
    want = {
        "qwen2_5": (32768, None),
        "qwen2_5_128k": (131072, "yarn"),
        "qwen3": (40960, None),
        "qwen3_128k": (131072, "yarn"),
        "phi3_5_mini": (131072, "longrope"),
        "mistral_nemo": (131072, None),
        "llama3_2_1b": (131072, "llama3"),
        "llama3_2_3b": (131072, "llama3"),
    }
    for name, (positions, rope) in want.items():
        args = models.ModelArgs.from_preset(yaml.safe_load((REPO / "conf/model" / f"{name}.yaml").read_text()))
        assert (args.max_seq_len, (args.rope_scaling or {}).get("rope_type")) == (positions, rope), name
        assert f"`{name}`" in (REPO / "README.md").read_text(), f"README's model table lacks {name}"
    phi = models.ModelArgs.from_preset(yaml.safe_load((REPO / "conf/model/phi3_5_mini.yaml").read_text()))
    assert phi.rope_scaling["original_max_position_embeddings"] == 4096 and phi.reencode_position() == 4096
    assert (
        models.ModelArgs.from_preset(yaml.safe_load((REPO / "conf/model/mistral_nemo.yaml").read_text())).head_dim
        == 128
    )


def test_overrides_apply_over_a_checkpoints_config(hf_checkpoint):
    """A 128K preset pointed at a real checkpoint (whose config.json has no YaRN) still runs YaRN."""
    _, path = hf_checkpoint("qwen2")
    preset = yaml.safe_load((REPO / "conf/model/qwen2_5_128k.yaml").read_text()) | {"path": str(path)}
    args = models.ModelArgs.from_preset(preset)
    assert args.rope_scaling["rope_type"] == "yarn" and args.vocab_size == 96  # the checkpoint's shape
    model = models.load_model(path, dtype=torch.float32, overrides=preset["overrides"])
    assert model.args == args


def test_a_context_past_the_positions_names_the_longer_presets():
    from omegaconf import OmegaConf

    from longctx.conf.schema import OptionError
    from longctx.preflight import options

    preset = yaml.safe_load((REPO / "conf/model/qwen3.yaml").read_text())
    cfg = OmegaConf.create({"model": preset | {"extrapolate": False}, "task": {"max_new_tokens": 64}})
    args = models.ModelArgs.from_preset(yaml.safe_load((REPO / "conf/model/qwen3.yaml").read_text()))
    with pytest.raises(OptionError, match=r"use ctx <= 40896, model=qwen3_128k \(yarn rope to 131072\), or model"):
        options.check_positions(cfg, args, 65536, "ctx")


def test_preset_features():
    load = lambda n: models.ModelArgs.from_hf(yaml.safe_load((REPO / "conf/model" / f"{n}.yaml").read_text())["config"])  # noqa: E731
    assert load("llama3").rope_scaling["rope_type"] == "llama3" and load("llama3").max_seq_len == 131072
    assert load("mistral").layer_windows == (4096,) * 32
    assert load("qwen2_5").qkv_bias and load("qwen2_5").layer_windows == (None,) * 28
    assert load("qwen3").qk_norm and load("smollm2").tie_embeddings
    g = load("gemma3_270m")
    assert g.layer_windows == ((512,) * 5 + (None,)) * 3 and g.local_rope_theta == 10000.0 and g.max_seq_len == 32768
    g = load("gemma3_27b")
    assert (
        g.attn_scale == 168**-0.5
        and g.rope_scaling == {"rope_type": "linear", "factor": 8.0}
        and g.local_rope_scaling is None
    )


@pytest.mark.parametrize("name", sorted(GEMMA3_REPORT))
def test_gemma3_text_shapes_match_the_report(name):
    preset = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    with torch.device("meta"):
        model = Transformer(models.ModelArgs.from_hf(preset["config"]))
    embedding = model.tok_embeddings.weight.numel()
    rest = sum(p.numel() for p in model.parameters()) - embedding
    want_embedding, want_rest = GEMMA3_REPORT[name]
    assert abs(rest / 1e6 - want_rest) / want_rest < 0.001  # non-embedding: to the report's last digit
    assert abs(embedding / 1e6 - want_embedding) / want_embedding < 0.01  # the report rounds the vocabulary up
