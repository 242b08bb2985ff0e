"""The run's own options, how they become torch objects, and every check that can run before anything starts.

`check(cfg, tasks)` is the one place the runner's options are checked: each option against the schema of the room
that owns it (conf/schema.py: the run's own below, a strategy's and a decode method's in attention/, a task's in
tasks/), then what crosses options or reads files: input files (existence, kind, encoding, jsonl records), output
paths, prompt lengths against the model's positions, the strategy's and decode method's constraints against the
context and the ranks. Each failure is an `OptionError` naming the option (or file and line) and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx import attention
from longctx.attention.quant import FP8_CAPABILITY, ONE_BYTE
from longctx.attention.strategy import AUTO_CHUNK
from longctx.conf.schema import OptionError, check_node, option, schema_of
from longctx.models.builtin import BUILTINS
from longctx.models.config import DTYPES, ModelArgs

__all__ = ["OptionError", "RunOptions", "TaskSpec", "check", "resolve_device", "resolve_dtype", "resolve_kv_dtype"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`device=auto` is this process's GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`dtype=auto` is bf16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --- the schema of the run's own options (the groups' are declared where they are read)


def _device(value: str) -> str | None:
    kind, _, index = value.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        return "is not a device: device must be auto, cpu, cuda or cuda:N"
    return None


@dataclass
class ModelOptions:
    name: str = option("", "the preset's name")
    path: str | None = option(
        None,
        "a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer); null: the built-in model or random weights of the preset's shape",
    )
    builtin: str | None = option(
        None, "the built-in model made on first use where path is null (models/builtin.py)", choices=tuple(BUILTINS)
    )
    extrapolate: bool = option(
        False, "allow prompts past the model's trained positions in generate/ruler (answers degrade)"
    )
    config: dict[str, Any] = option(doc="the preset's Hugging Face config.json: its shape", factory=dict)
    longer: str | None = option(
        None, "a preset of the same checkpoint at more positions (qwen2_5_128k), named where a context is past these"
    )
    overrides: dict[str, Any] = option(
        doc="config.json keys set over the checkpoint's (or config's), as a model card asks: a rope_scaling block "
        "for YaRN past the trained context",
        factory=dict,
    )


@dataclass
class CtxOptions:
    name: str = option("", "the preset's name")
    length: int = option(2048, "context tokens: the demo prompt's, ruler's default length, bench's prompt", low=1)
    chunk: int | None = option(
        None,
        "context tokens a rank feeds through the model per phase-1 pass, which bounds its activations; null: "
        f"{AUTO_CHUNK} (ring across ranks: its whole shard)",
        low=1,
    )


KV_DTYPES = ("auto", *DTYPES, *ONE_BYTE)


@dataclass
class KVOptions:
    dtype: str = option(
        "auto",
        "how the KV cache stores keys and values: auto (the model's dtype), fp8 (e4m3 with a scale per token and KV "
        "head: half of bf16's bytes; GPUs of compute capability 8.9 or newer, or the CPU), int8 (the same bytes and "
        "scales, any device; closer to full width on RULER: ACCURACY.md), or the model's dtype by name",
        choices=KV_DTYPES,
    )


def resolve_kv_dtype(name: str) -> torch.dtype | None:
    """`kv.dtype` as a torch dtype; None for auto (the model's)."""
    return None if name == "auto" else ONE_BYTE[name] if name in ONE_BYTE else DTYPES[name]


@dataclass
class ParallelOptions:
    nproc: int = option(
        1,
        "ranks: runner.py starts that many (one GPU each, or gloo on CPU); under torchrun it follows the launcher",
        low=1,
    )
    tp: int = option(1, "ranks per host, tensor parallel inside it: nproc = hosts × tp", low=1)
    backend: str = option("auto", "auto: nccl on CUDA, gloo on CPU", choices=("auto", "nccl", "gloo"))
    timeout_s: float = option(
        300.0,
        "collective timeout: a rank that stops answering ends the run instead of hanging it",
        low=0,
        low_open=True,
    )


@dataclass
class MemoryOptions:
    check: bool = option(True, "compare the memory plan (task=plan shows it) with free memory before loading anything")
    limit_gib: float | None = option(
        None, "memory per rank to plan against instead of what the device has free", low=0, low_open=True
    )


@dataclass
class WandbOptions:
    mode: str = option(
        "offline",
        "offline (`wandb sync` later), online (needs a login) or disabled",
        choices=("offline", "online", "disabled"),
    )
    project: str = option("longctx", "the W&B project")
    entity: str | None = option(None, "the W&B entity (team or user)")


@dataclass
class RunOptions:
    """conf/config.yaml's options outside the `attention`, `decode` and `task` groups, whose schema is their choice's."""

    device: str = option("auto", "auto: cuda if available, else cpu; or cpu, cuda, cuda:N", check=_device)
    dtype: str = option("auto", "auto: bf16 on cuda, fp32 on cpu", choices=("auto", *DTYPES))
    seed: int = option(0, "seed of sampling and of random weights", low=0)
    model: ModelOptions = option(doc="the model preset (conf/model/)", factory=ModelOptions)
    ctx: CtxOptions = option(doc="the context length preset (conf/ctx/)", factory=CtxOptions)
    kv: KVOptions = option(doc="the KV cache", factory=KVOptions)
    parallel: ParallelOptions = option(doc="ranks (conf/parallel/)", factory=ParallelOptions)
    memory: MemoryOptions = option(doc="the check before loading", factory=MemoryOptions)
    wandb: WandbOptions = option(doc="W&B logging", factory=WandbOptions)


@dataclass(frozen=True)
class TaskSpec:
    """What the runner knows of a task (tasks/__init__.py lists them): how it runs, the schema of its options, the
    checks of its own that cross options or read files (`check(cfg, model_args)`), and whether it needs ranks with a
    model (plan needs neither) and real weights."""

    run: Callable
    options: type
    check: Callable[[Any, ModelArgs], None] | None = None
    needs_model: bool = True
    needs_weights: bool = False


# --- files


def input_file(cfg, key: str) -> Path:
    """An existing regular file of UTF-8 text; its content is read once here."""
    path = Path(_get(cfg, key)).expanduser()
    if not path.exists():
        raise OptionError(f"{key}={path}: no such file")
    if not path.is_file():
        raise OptionError(f"{key}={path} is a {'directory' if path.is_dir() else 'special file'}, not a text file")
    read_text(path, key)
    return path


def read_text(path: Path, key: str) -> str:
    """The file's text; binary or non-UTF-8 content is an error naming the option and the byte."""
    return text_of(path.read_bytes(), f"{key}={path}")


def text_of(data: bytes, what: str) -> str:
    """`data` as UTF-8 text; binary or other content is an error naming `what` (an option and its file) and the byte."""
    if b"\0" in data[:65536]:
        raise OptionError(f"{what} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(
            f"{what} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); convert it, e.g. "
            "`iconv -f latin1 -t utf-8`"
        ) from None


def results_file(cfg, key: str) -> Path | None:
    """An `output_file` that runs append to: one that already holds rows is refused unless task.resume=true."""
    path = output_file(cfg, key)
    if path is not None and path.is_file() and path.stat().st_size and not cfg.task.resume:
        raise OptionError(
            f"{key}={path} already holds results; pass task.resume=true to go on from them (a results file belongs "
            "to one model and strategy), or name another file"
        )
    return path


def output_file(cfg, key: str) -> Path | None:
    """A path whose directory exists and is writable, and that is not itself a directory."""
    value = _get(cfg, key)
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise OptionError(f"{key}={path} is a directory; name a file in it")
    parent = path.parent
    if not parent.is_dir():
        raise OptionError(f"{key}={path}: the directory {parent} does not exist; create it or name another file")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"{key}={path} is not writable")
    return path


JSONL_FIELDS = ("input_context", "input_query")


def jsonl_records(path: Path, key: str) -> list[tuple[int, dict]]:
    """The records of an input jsonl file, each with its line number: one JSON object per non-blank line with string
    `input_context` and `input_query` (and optionally `output`). Every message about a record names it as
    `FILE:LINE`, the line an editor jumps to."""
    records = []
    for number, line in enumerate(read_text(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise OptionError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise OptionError(f"{path}:{number}: a record must be a JSON object; got {type(record).__name__}")
        for field in JSONL_FIELDS:
            if not isinstance(record.get(field), str):
                got = "missing" if field not in record else f"a {type(record[field]).__name__}"
                raise OptionError(f"{path}:{number}: {field} must be a string; it is {got}")
        records.append((number, record))
    if not records:
        raise OptionError(f'{key}={path} holds no records; each line is {{"input_context": ..., "input_query": ...}}')
    return records


def _get(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# --- the run


def check(cfg, tasks: Mapping[str, TaskSpec]) -> None:
    """Every check that can run before a process or a model is started (see the module docstring)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    # each option against its room's schema; then each schema's own checks across its options (`__post_init__`)
    check_node(RunOptions, raw, "", skip=("attention", "decode", "task"))
    spec = _group_choice(raw, "task", lambda name: tasks[name] if name in tasks else _unknown(name, tasks))
    task = check_node(spec.options, raw["task"], "task", f"task={raw['task']['name']}", skip=("name",))
    strategy = _group_choice(raw, "attention", attention.strategy_class)
    node = raw["attention"]
    schema = strategy.params_schema()
    params = check_node(schema, node.get("params"), "attention.params", f"attention={node['name']}")
    check_node(strategy.NodeOptions, node, "attention", f"attention={node['name']}", skip=("name", "params"))
    method = _group_choice(raw, "decode", attention.decode_class)
    decode = check_node(schema_of(method), raw["decode"], "decode", f"decode={raw['decode']['name']}", skip=("name",))
    try:
        spec.options(**task), schema(**params)
        decode = method(**decode)
    except ValueError as e:
        raise OptionError(str(e)) from None

    nproc, tp = cfg.parallel.nproc, cfg.parallel.tp
    if nproc % tp:
        raise OptionError(
            f"parallel.tp={tp} does not divide parallel.nproc={nproc}: nproc is hosts × tp; use "
            f"parallel.nproc={max(tp, nproc // tp * tp)} or another tp"
        )
    _check_device(cfg, spec)
    what, n = _shortest_context(cfg)
    try:
        strategy.check(node, n, what, nproc, tp)
        decode.check_context(n, what)
    except ValueError as e:
        raise OptionError(str(e)) from None
    check_chunk(cfg, *_longest_context(cfg)[::-1])
    args = _check_model(cfg, spec)
    _check_tensor_parallel(cfg, args)
    if spec.check is not None:
        spec.check(cfg, args)


def _group_choice(raw: dict, group: str, find: Callable[[str], Any]) -> Any:
    node = raw.get(group)
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise OptionError(f"{group} must be a config group with a name (pick one: {group}=NAME); got {node!r}")
    try:
        return find(node["name"])
    except ValueError as e:
        raise OptionError(f"{group}.name: {e}") from None


def _unknown(name: str, tasks: Mapping) -> None:
    raise ValueError(f"unknown task {name!r}; available: {', '.join(tasks)}")


def _shortest_context(cfg) -> tuple[str, int]:
    """The shortest context the task feeds, and where its length comes from: a task's `lengths` where it sets them,
    else ctx.length."""
    lengths = cfg.task.get("lengths")
    return ("task.lengths", min(lengths)) if lengths else ("ctx.length", cfg.ctx.length)


def _longest_context(cfg) -> tuple[str, int]:
    """The longest context the task feeds, and where its length comes from."""
    lengths, prompt = cfg.task.get("lengths"), cfg.task.get("prompt_tokens")
    if lengths:
        return "task.lengths", max(lengths)
    return ("task.prompt_tokens", prompt) if prompt else ("ctx.length", cfg.ctx.length)


def take_launcher_world(cfg, world: int) -> None:
    """Under torchrun the launcher fixes the number of ranks: `parallel.nproc` follows it (where left at 1) or must
    equal it, so that every check and the memory plan see the real layout."""
    if cfg.parallel.nproc not in (1, world):
        raise OptionError(
            f"parallel.nproc={cfg.parallel.nproc} but torchrun started {world} processes; leave "
            "parallel.nproc out under torchrun (it follows the launcher) or make them equal"
        )
    cfg.parallel.nproc = world


def _check_device(cfg, spec: TaskSpec) -> None:
    _check_kv_device(cfg, spec)
    if not cfg.device.startswith("cuda") or not spec.needs_model:
        return
    if not torch.cuda.is_available():
        raise OptionError(
            f"device={cfg.device} but this machine has no usable CUDA GPU; use device=auto or device=cpu "
            "(task=plan plans a GPU run without one)"
        )
    if cfg.parallel.nproc > torch.cuda.device_count():
        raise OptionError(
            f"parallel.nproc={cfg.parallel.nproc} but this machine has {torch.cuda.device_count()} "
            "GPUs; use at most that many ranks here, or torchrun across machines"
        )


def _check_kv_device(cfg, spec: TaskSpec) -> None:
    """A full-width KV dtype other than the model's, or FP8 KV on a GPU that cannot compute with it, stops here,
    naming the GPU and the choices."""
    device = resolve_device(cfg.device)
    if cfg.kv.dtype not in ("auto", *ONE_BYTE) and DTYPES[cfg.kv.dtype] != resolve_dtype(cfg.dtype, device):
        model = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
        raise OptionError(
            f"kv.dtype={cfg.kv.dtype} differs from the model's {model} (dtype={cfg.dtype} on {device.type}): a "
            "full-width cache holds keys and values as the model computes them; use kv.dtype=auto, or fp8 or int8 to "
            "store them in half the bytes"
        )
    if cfg.kv.dtype != "fp8" or not spec.needs_model:
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise OptionError(
            f"kv.dtype=fp8 needs a GPU of compute capability {'.'.join(map(str, FP8_CAPABILITY))} or newer, but "
            f"{torch.cuda.get_device_name(device)} is {'.'.join(map(str, capability))}; use kv.dtype=int8 (the same "
            f"bytes), auto or bf16 (kv.dtype: {', '.join(KV_DTYPES)})"
        )


def check_chunk(cfg, n_ctx: int, what: str) -> None:
    """`ctx.chunk` against the longest context the task feeds (`what` names where its length comes from) and the
    strategy's layout of it (ring across ranks feeds whole shards)."""
    chunk = cfg.ctx.get("chunk")
    if chunk is None:
        return
    if chunk > n_ctx:
        raise OptionError(
            f"ctx.chunk={chunk} is larger than the context ({what}={n_ctx}); use at most {n_ctx}, or leave ctx.chunk "
            f"unset (null: {AUTO_CHUNK} tokens per pass)"
        )
    hosts = cfg.parallel.nproc // cfg.parallel.tp
    strategy = attention.from_config(cfg.attention, cfg.get("decode"), n_ctx, hosts, chunk=chunk)
    try:
        for rank in range(hosts):
            strategy.at(rank, hosts).context_passes(n_ctx)
    except ValueError as e:
        raise OptionError(str(e)) from None


def _check_model(cfg, spec: TaskSpec) -> ModelArgs:
    path = cfg.model.path
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise OptionError(f"model.path={p} does not exist; point it at a Hugging Face checkpoint directory")
        if not p.is_dir():
            raise OptionError(
                f"model.path={p} is a file; point it at the directory that holds config.json, the "
                "*.safetensors files and the tokenizer"
            )
        if not (p / "config.json").is_file():
            raise OptionError(
                f"model.path={p} has no config.json; is it a Hugging Face checkpoint directory? "
                "(`python tools/convert.py` makes one from GGUF or Meta checkpoints)"
            )
    if path is None and not cfg.model.get("builtin") and spec.needs_weights:
        raise OptionError(
            f"model preset {cfg.model.name!r} names no checkpoint, and task={cfg.task.name} needs real weights. Point "
            "it at a Hugging Face directory (config.json, *.safetensors, tokenizer) with model.path=/path/to/dir, or make "
            "one with `python tools/convert.py gguf|meta|hf ...`"
        )
    try:
        return ModelArgs.from_preset(cfg.model)
    except ValueError as e:
        raise OptionError(f"model={cfg.model.name}: {e}") from None


def _check_tensor_parallel(cfg, args: ModelArgs) -> None:
    from longctx.parallel.tensor import check_degree

    try:
        check_degree(args, cfg.parallel.tp, f"model={cfg.model.name}")
    except ValueError as e:
        raise OptionError(str(e)) from None


# --- prompts against the model's positions and the strategy's layout (tasks that answer call these)


def check_layout(cfg, n_ctx: int, what: str) -> None:
    """The strategy can lay a context of `n_ctx` tokens (`what`: whose) out over the hosts (star: at least a block
    for each), checked before any rank starts."""
    hosts = cfg.parallel.nproc // cfg.parallel.tp
    strategy = attention.from_config(cfg.attention, cfg.get("decode"), n_ctx, hosts)
    try:
        for rank in range(hosts):
            strategy.at(rank, hosts).fed_tokens(n_ctx)
    except ValueError as e:
        raise OptionError(f"{what} ({n_ctx} context tokens): {e}") from None


def check_positions(cfg, args: ModelArgs, n: int, what: str) -> None:
    """`n` context tokens plus task.max_new_tokens must fit the model's positions, unless the user accepts
    extrapolation."""
    new = cfg.task.max_new_tokens
    if cfg.model.extrapolate or n + new <= args.max_seq_len:
        return
    longer = ""
    if cfg.model.get("longer"):
        other = longer_preset(cfg.model.longer)
        longer = (
            f"model={cfg.model.longer} ({(other.rope_scaling or {}).get('rope_type')} rope to {other.max_seq_len}), "
        )
    raise OptionError(
        f"{what}={n} plus task.max_new_tokens={new} is past the {args.max_seq_len} positions {cfg.model.name} was "
        f"trained for; use ctx <= {args.max_seq_len - new}, {longer}or model.extrapolate=true to run past them anyway "
        "(answers degrade)"
    )


def longer_preset(name: str) -> ModelArgs:
    """The shape of the preset a preset names as its checkpoint at more positions (`model.longer`)."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise OptionError(f"model.longer={name} names no preset; use one of conf/model/ or null")
    return ModelArgs.from_preset(OmegaConf.load(path))


DEMO_QUERY_ROOM = 256  # tokens of the demo's question and chat template after its context


def demo_context(ctx_length: int, max_seq_len: int, new_tokens: int) -> int:
    """Context tokens of the generate demo: `ctx.length`, or less where the question and answer would not fit in the
    model's positions after it (`ctx=128k` on a 131,072-position model fills its window)."""
    return min(ctx_length, max_seq_len - new_tokens - DEMO_QUERY_ROOM)


def check_prompt_length(n_prompt: int, new_tokens: int, limit: int, what: str) -> None:
    """A tokenized prompt must leave room for its new tokens within `limit` positions."""
    if n_prompt + new_tokens > limit:
        raise OptionError(
            f"{what}: {n_prompt} prompt tokens plus {new_tokens} new tokens are past the model's {limit} positions; "
            "shorten it, lower task.max_new_tokens, or set model.extrapolate=true to run past them anyway"
        )
