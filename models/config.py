"""Model configuration: one dataclass for every supported family, built from a Hugging Face `config.json`.

Family differences are data: biases, q/k norms, sliding windows, rope scaling and tied embeddings, and Gemma 3's
scaled embeddings, offset norms, four norms per block, GELU MLP, query scale, per-layer-type rope and logit
soft-capping are fields here, and `models/transformer.py` reads them. Nothing else in the project branches on the
family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from longctx.conf.schema import check_value
from longctx.models import rope

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the names configs and tools use
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
# Hugging Face activation names -> ours.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


@dataclass
class ModelArgs:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # A checked scaling block (models/rope.py `read_scaling`), or None for plain rope.
    rope_scaling: dict[str, Any] | None = None
    # The share of each head the rotary embedding turns (Phi-4-mini: 0.75); the rest passes through unrotated.
    partial_rotary_factor: float = 1.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # One entry per layer: the sliding-window size of that layer, or None for full attention.
    layer_windows: tuple[int | None, ...] = field(default_factory=tuple)
    # Rotary base and scaling of the sliding-window layers where they differ from the full-attention layers'
    # (Gemma 3: 10,000 and no scaling locally, 1,000,000 and the checkpoint's scaling globally).
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma: embeddings times sqrt(dim), RMSNorm as x * (norm_offset + w), a norm after attention and after the MLP
    # too (sandwich_norms), a GELU-gated MLP, a query scale other than head_dim**-0.5, tanh-capped logits.
    embed_scale: float = 1.0
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    mlp_act: str = "silu"
    attn_scale: float | None = None  # None: head_dim**-0.5
    final_softcap: float | None = None
    # Phi-3: generation re-encodes the whole sequence once, when it first runs past the original context, so that
    # every key is rotated with LongRoPE's long factors (as transformers' Phi3ForCausalLM generates); other families
    # keep the keys they cached.
    reencode_past_original: bool = False

    def __post_init__(self) -> None:
        if not self.layer_windows:
            self.layer_windows = (None,) * self.n_layers
        self.layer_windows = tuple(self.layer_windows)
        self.eos_token_ids = tuple(self.eos_token_ids)
        if len(self.layer_windows) != self.n_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for scaling in (self.rope_scaling, self.local_rope_scaling):
            rope_type = (scaling or {}).get("rope_type", "default")
            if rope_type not in rope.ROPE_TYPES:
                raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: {rope.ROPE_TYPES}")
        if not (0 < self.partial_rotary_factor <= 1) or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor} of {self.head_dim}-dim heads turns "
                f"{self.rotary_dim} dims; it must be in (0, 1] and turn an even number of them"
            )
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"MLP activation {self.mlp_act!r} is not supported; supported: {MLP_ACTIVATIONS}")

    @property
    def family(self) -> str:
        return self.architecture.removesuffix("ForCausalLM").lower()

    @property
    def rotary_dim(self) -> int:
        """Dims of each head the rotary embedding turns (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def ropes(self) -> list[tuple[float, dict[str, Any] | None]]:
        """(theta, scaling) of each distinct rope: the full-attention layers', then the sliding-window layers' where
        theirs differs (`layer_rope` says which a layer uses)."""
        full = (self.rope_theta, self.rope_scaling)
        return [full] if self.local_rope_theta is None else [full, (self.local_rope_theta, self.local_rope_scaling)]

    def reencode_position(self) -> int | None:
        """The position whose token, when generated, makes the model re-encode its sequence (None: never)."""
        scaling = self.rope_scaling or {}
        if self.reencode_past_original and scaling.get("rope_type") == "longrope":
            return scaling["original_max_position_embeddings"]
        return None

    @property
    def layer_rope(self) -> list[int]:
        """Which of `ropes()` each layer uses."""
        return [int(w is not None and self.local_rope_theta is not None) for w in self.layer_windows]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from the dict of a Hugging Face `config.json` (transformers 4.x or 5.x layout)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"a model config must be a JSON object; got {type(cfg).__name__}")
        cfg = _text_part(cfg)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and cfg.get("model_type") == "gemma3_text":
            arch = "Gemma3ForCausalLM"
        if arch == "Gemma3ForCausalLM":
            cfg = {**_GEMMA3_DEFAULTS, **cfg}
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        _check_shape_keys(cfg)
        n_heads = cfg["num_attention_heads"]
        n_layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        partial = _partial_rotary_factor(cfg)
        rotary_dim = int(head_dim * partial)
        if arch == "Phi3ForCausalLM":
            cfg = {"original_max_position_embeddings": 4096, **cfg}  # transformers' Phi3Config default
        rope_theta, rope_scaling = _rope_settings(cfg, rotary_dim, arch)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        gemma = _gemma_fields(cfg, rotary_dim) if arch == "Gemma3ForCausalLM" else {}
        if gemma:
            rope_theta, rope_scaling = gemma.pop("rope")
        max_seq_len = rope.context_of(rope_scaling, cfg.get("max_position_embeddings", 4096))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            max_seq_len=max_seq_len,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            o_bias=arch not in ("Qwen2ForCausalLM", "Phi3ForCausalLM") and bool(cfg.get("attention_bias", False)),
            mlp_bias=arch != "Phi3ForCausalLM" and bool(cfg.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            layer_windows=_binding(_layer_windows(arch, cfg, n_layers), max_seq_len),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            reencode_past_original=arch == "Phi3ForCausalLM",
            **gemma,
        )

    @classmethod
    def from_preset(cls, preset: Any) -> ModelArgs:
        """The shape a model preset (conf/model/) runs: its checkpoint's config.json where it names one, else the
        preset's own config; its `overrides` set over either."""
        path, overrides = preset.get("path"), _plain(preset.get("overrides") or {})
        if path is not None and (Path(path).expanduser() / "config.json").is_file():
            return cls.from_json(Path(path).expanduser() / "config.json", overrides)
        return cls.from_hf({**_plain(preset["config"]), **overrides})

    @classmethod
    def from_json(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ModelArgs:
        """The config.json at `path`, with `overrides` (top-level keys, as a model card asks one to edit them: a
        rope_scaling block for YaRN) set over it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint directory needs the config.json of the model")
        cfg = read_json(path)
        try:
            return cls.from_hf({**cfg, **_plain(overrides)} if overrides and isinstance(cfg, dict) else cfg)
        except ValueError as e:
            where = f"{path} with model.overrides {sorted(overrides)}" if overrides else str(path)
            raise ValueError(f"{where}: {e}") from None


def _plain(value: Any) -> Any:
    """A mapping (a composed config's node too) as plain dicts and lists, all the way down."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """A JSON file's value; invalid JSON or text is an error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-convert the checkpoint") from None


# Keys every supported config.json has, each a positive whole number; the optional ones are checked where present.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_SHAPE_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _check_shape_keys(cfg: dict[str, Any]) -> None:
    missing = [k for k in _SHAPE_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"the model config lacks {', '.join(missing)}")
    for key in (*_SHAPE_KEYS, *(k for k in _OPTIONAL_SHAPE_KEYS if cfg.get(k) is not None)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"the model config's {key} must be a positive whole number; got {value!r}")
    for key, (kind, meta) in _VALUE_KEYS.items():
        if key in cfg:  # present but invalid is an error, never a silent default
            check_value(f"the model config's {key}", cfg[key], kind, meta)


_POSITIVE = {"low": 0, "low_open": True}
# Other keys the loader reads, where a config has them: their types and ranges (null allowed where it means "none").
_VALUE_KEYS: dict[str, tuple[Any, dict]] = {
    "rms_norm_eps": (float, _POSITIVE),
    "rope_theta": (Optional[float], _POSITIVE),
    "rope_local_base_freq": (float, _POSITIVE),
    "query_pre_attn_scalar": (float, _POSITIVE),
    "final_logit_softcapping": (Optional[float], _POSITIVE),
    "rope_scaling": (Optional[dict], {}),
    "rope_parameters": (Optional[dict], {}),
    "partial_rotary_factor": (Optional[float], {"low": 0, "low_open": True, "high": 1}),
    "original_max_position_embeddings": (Optional[int], {"low": 1}),
    "tie_word_embeddings": (bool, {}),
    "attention_bias": (bool, {}),
    "mlp_bias": (bool, {}),
    "use_sliding_window": (bool, {}),
    "max_window_layers": (int, {"low": 0}),
    "sliding_window_pattern": (int, {"low": 1}),
    "bos_token_id": (Optional[int], {"low": 0}),
    "eos_token_id": (Any, {"check": lambda v: _token_ids(v)}),
}


def _token_ids(value: Any) -> str | None:
    ids = value if isinstance(value, list) else [value]
    if value is None or all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return None
    return "{key} must be a token id or a list of them; got {value}"


def _text_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """A Gemma 3 config that only nests the text model's keys under `text_config` is read as that text model."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    if cfg.get("vision_config") is not None:
        raise ValueError(
            "this is a Gemma 3 vision-language config (it has a vision_config): longctx runs text models only; "
            "use a text-only checkpoint (Gemma3ForCausalLM, model_type gemma3_text)"
        )
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("a gemma3 config without a vision tower must nest the text model's keys in text_config")
    return {**text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


# What transformers' Gemma3TextConfig assumes for keys a config leaves out.
_GEMMA3_DEFAULTS = {
    "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh",
}  # fmt: skip
# Gemma 3 keys that change the computation but that this project does not implement: refused, not ignored.
_GEMMA_UNSUPPORTED = {
    "attn_logit_softcapping": None,  # None (the value in every Gemma 3 release) is the only supported value
    "use_bidirectional_attention": False,
}


def _gemma_fields(cfg: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
    for key, supported in _GEMMA_UNSUPPORTED.items():
        if cfg.get(key, supported) not in (supported,):
            raise ValueError(f"Gemma 3 config key {key}={cfg[key]!r} is not supported (only {supported!r})")
    act = cfg["hidden_activation"]
    if act not in _HF_ACTIVATIONS:
        raise ValueError(
            f"Gemma 3 config: hidden_activation {act!r} is not supported; supported: {', '.join(_HF_ACTIVATIONS)}"
        )
    # Full-attention and sliding-window layers each have their rope: transformers 5 keys `rope_parameters` by layer
    # type; 4.x checkpoints carry rope_theta + rope_scaling (full) and rope_local_base_freq (sliding).
    params = cfg.get("rope_parameters") or {}
    by_type = params if "full_attention" in params or "sliding_attention" in params else None
    if by_type is not None:
        rest = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
        full, local = (
            _rope_settings(
                {**rest, "rope_parameters": {"rope_theta": theta, **(by_type.get(kind) or {})}},
                rotary_dim,
                "Gemma3ForCausalLM",
                f"rope_parameters.{kind}",
            )
            for kind, theta in (("full_attention", 1_000_000.0), ("sliding_attention", 10_000.0))
        )
    else:
        full = _rope_settings({"rope_theta": 1_000_000.0, **cfg}, rotary_dim, "Gemma3ForCausalLM")
        local = (float(cfg.get("rope_local_base_freq", 10_000.0)), None)
    cap = cfg.get("final_logit_softcapping")
    return {
        "rope": full,
        "local_rope_theta": local[0],
        "local_rope_scaling": local[1],
        "embed_scale": cfg["hidden_size"] ** 0.5,
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "mlp_act": _HF_ACTIVATIONS[act],
        "attn_scale": float(cfg["query_pre_attn_scalar"]) ** -0.5,
        "final_softcap": float(cap) if cap else None,
    }


# Old names some families' configs give their rope type.
_ROPE_ALIASES = {"Phi3ForCausalLM": {"su": "longrope", "yarn": "longrope"}}
# Families whose reference implementation takes only some rope types.
_FAMILY_ROPES = {"Phi3ForCausalLM": ("default", "longrope")}


def _rope_settings(
    cfg: dict[str, Any], rotary_dim: int, arch: str, where: str | None = None
) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes `rope_parameters`; released checkpoints carry `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    theta = cfg["rope_theta"] if cfg.get("rope_theta") is not None else params.get("rope_theta", 10000.0)
    check_value("the model config's rope_theta", theta, float, _POSITIVE)
    block = cfg.get("rope_scaling") or params
    where = where or ("rope_scaling" if cfg.get("rope_scaling") else "rope_parameters")
    family = (arch, _FAMILY_ROPES[arch]) if arch in _FAMILY_ROPES else None
    return float(theta), rope.read_scaling(block, where, cfg, rotary_dim, _ROPE_ALIASES.get(arch), family)


def _partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """The share of each head that is rotated: a top-level key, or (transformers 5) one in `rope_parameters`."""
    value = cfg.get("partial_rotary_factor")
    if value is None:
        value = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        check_value(
            "the model config's rope_parameters.partial_rotary_factor",
            value,
            float,
            {"low": 0, "low_open": True, "high": 1},
        )
    return float(value)


def _binding(windows: tuple[int | None, ...], positions: int) -> tuple[int | None, ...]:
    """Windows that can bind within the model's positions; one no shorter than them (Phi-3.5's 262,144 at 128K) is
    full attention there, and runs as such."""
    return tuple(None if w is not None and w >= positions else w for w in windows)


def _layer_windows(arch: str, cfg: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * n_layers
    if types := cfg.get("layer_types"):
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown or len(types) != n_layers:
            raise ValueError(
                f"layer_types must name sliding_attention or full_attention for each of the {n_layers} layers; "
                f"got {len(types)} entries{f' with {sorted(unknown)}' if unknown else ''}"
            )
        return tuple(window if t == "sliding_attention" else None for t in types)
    if arch == "Gemma3ForCausalLM":  # older configs: every `sliding_window_pattern`-th layer attends fully
        pattern = cfg.get("sliding_window_pattern", 6)
        return tuple(window if (i + 1) % pattern else None for i in range(n_layers))
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return (window,) * n_layers
    first = cfg.get("max_window_layers", n_layers)  # Qwen: layers from this index on use the window
    return tuple(window if i >= first else None for i in range(n_layers))
