"""How a run's options become torch objects, and every check on them that can run before anything starts.

`check(cfg)` is the one place the runner's options are checked: types and ranges, input files (existence, kind,
encoding, jsonl records), output paths, prompt lengths against the model's positions and the strategy's
constraints. Each failure is an `OptionError` naming the option (or file and line) and the fix.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from longctx.models.config import DTYPES, ModelArgs


class OptionError(ValueError):
    """An option or input file that cannot work; the message names it and the fix."""


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


# --- value checks: each returns the value, or raises naming the option


def whole(cfg, key: str, low: int = 1, none: bool = False) -> int | None:
    value = _get(cfg, key)
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        also = " or null" if none else ""
        raise OptionError(f"{key} must be a whole number >= {low}{also}; got {value!r}")
    return value


def number(cfg, key: str, low: float, high: float = math.inf, low_open: bool = False, none: bool = False) -> float | None:
    value = _get(cfg, key)
    if value is None and none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if low_open else value >= low) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise OptionError(f"{key} must be a finite number in {bounds}{' or null' if none else ''}; got {value!r}")
    return value


def choice(cfg, key: str, choices) -> Any:
    value = _get(cfg, key)
    if value not in choices:
        raise OptionError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def flag(cfg, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise OptionError(f"{key} must be true or false; got {value!r}")
    return value


def text(cfg, key: str, none: bool = True) -> str | None:
    value = _get(cfg, key)
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise OptionError(f"{key} must be a string{' or null' if none else ''}; got {value!r}")
    return value


def strings(cfg, key: str) -> list[str]:
    value = _get(cfg, key)
    if isinstance(value, str):
        raise OptionError(f"{key} must be a list of strings: write {key}=[{value!r}] for one; got the string {value!r}")
    if value is None or not all(isinstance(v, str) for v in value):
        raise OptionError(f"{key} must be a list of strings; got {value!r}")
    return list(value)


def _get(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


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
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise OptionError(f"{key}={path} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"{key}={path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it, "
                          "e.g. `iconv -f latin1 -t utf-8`") from None  # fmt: skip


def results_file(cfg, key: str) -> Path | None:
    """An `output_file` that runs append to: one that already holds rows is refused unless task.resume=true."""
    path = output_file(cfg, key)
    if path is not None and path.is_file() and path.stat().st_size and not cfg.task.resume:
        raise OptionError(f"{key}={path} already holds results; pass task.resume=true to go on from them (a results "
                          "file belongs to one model and strategy), or name another file")  # fmt: skip
    return path


def output_file(cfg, key: str) -> Path | None:
    """A path whose directory exists and is writable, and that is not itself a directory."""
    value = text(cfg, key)
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


def jsonl_records(path: Path, key: str) -> list[dict]:
    """The records of an input jsonl file: one JSON object per non-blank line with string `input_context` and
    `input_query` (and optionally `output`); a bad line is named by its line number."""
    records = []
    for number_, line in enumerate(read_text(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise OptionError(f"{path}:{number_}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise OptionError(f"{path}:{number_}: a record must be a JSON object; got {type(record).__name__}")
        for field in JSONL_FIELDS:
            if not isinstance(record.get(field), str):
                got = "missing" if field not in record else f"a {type(record[field]).__name__}"
                raise OptionError(f"{path}:{number_}: {field} must be a string; it is {got}")
        records.append(record)
    if not records:
        raise OptionError(f"{key}={path} holds no records; each line is {{\"input_context\": ..., \"input_query\": ...}}")
    return records


# --- the run


def check(cfg, tasks) -> None:
    """Every check that can run before a process or a model is started (see the module docstring)."""
    from longctx import attention
    whole(cfg, "parallel.nproc")
    tp = whole(cfg, "parallel.tp")
    if cfg.parallel.nproc % tp:
        raise OptionError(f"parallel.tp={tp} does not divide parallel.nproc={cfg.parallel.nproc}: nproc is hosts × tp; "
                          f"use parallel.nproc={max(tp, cfg.parallel.nproc // tp * tp)} or another tp")  # fmt: skip
    number(cfg, "parallel.timeout_s", 0, low_open=True)
    choice(cfg, "parallel.backend", ("auto", "nccl", "gloo"))
    choice(cfg, "dtype", ("auto", *DTYPES))
    whole(cfg, "seed", low=0)
    whole(cfg, "ctx.length")
    choice(cfg, "wandb.mode", ("offline", "online", "disabled"))
    flag(cfg, "memory.check")
    number(cfg, "memory.limit_gib", 0, low_open=True, none=True)
    choice(cfg, "task.name", tasks)
    _check_device(cfg)
    choice(cfg, "attention.name", sorted(attention.REGISTRY))
    _check_attention(cfg)
    args = _check_model(cfg)
    _check_tensor_parallel(cfg, args)
    {"generate": _check_generate, "ruler": _check_ruler, "bench": _check_bench, "plan": _check_bench}[cfg.task.name](cfg)
    _check_positions(cfg, args)


def take_launcher_world(cfg, world: int) -> None:
    """Under torchrun the launcher fixes the number of ranks: `parallel.nproc` follows it (where left at 1) or must
    equal it, so that every check and the memory plan see the real layout."""
    if cfg.parallel.nproc not in (1, world):
        raise OptionError(f"parallel.nproc={cfg.parallel.nproc} but torchrun started {world} processes; leave "
                          "parallel.nproc out under torchrun (it follows the launcher) or make them equal")  # fmt: skip
    cfg.parallel.nproc = world


def _check_device(cfg) -> None:
    device = text(cfg, "device", none=False)
    try:
        kind = torch.device(device).type if device != "auto" else "auto"
    except RuntimeError:
        raise OptionError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from None
    if kind not in ("auto", "cpu", "cuda"):
        raise OptionError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if kind == "cuda" and cfg.task.name != "plan":
        if not torch.cuda.is_available():
            raise OptionError(f"device={device} but this machine has no usable CUDA GPU; use device=auto or device=cpu "
                              "(task=plan plans a GPU run without one)")  # fmt: skip
        if cfg.parallel.nproc > torch.cuda.device_count():
            raise OptionError(f"parallel.nproc={cfg.parallel.nproc} but this machine has {torch.cuda.device_count()} "
                              "GPUs; use at most that many ranks here, or torchrun across machines")  # fmt: skip


def _check_attention(cfg) -> None:
    from longctx import attention
    from longctx.attention.star import ANCHOR_MODES
    from longctx.attention.strategy import AttentionStrategy

    name = cfg.attention.name
    params = _get(cfg, "attention.params") or {}
    if not isinstance(params, dict):
        raise OptionError(f"attention.params must be a mapping of options; got {params!r}")
    cls = attention.REGISTRY[name]
    accepted = (set(inspect.signature(cls).parameters) | set(inspect.signature(AttentionStrategy).parameters)) - {"group", "decode_options"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise OptionError(f"attention.params.{unknown[0]} is not an option of attention={name}; its options: "
                          f"{', '.join(sorted(accepted)) or 'none'}")  # fmt: skip
    _check_decode(cfg)
    hosts = cfg.parallel.nproc // cfg.parallel.tp
    if name == "global" and hosts > 1:
        if cfg.parallel.tp > 1:
            raise OptionError(f"attention=global runs on one host, but parallel.nproc={cfg.parallel.nproc} with "
                              f"parallel.tp={cfg.parallel.tp} makes {hosts} hosts; use parallel.tp={cfg.parallel.nproc} "
                              "(one host), or attention=ring (exact) or attention=star across hosts")  # fmt: skip
        raise OptionError(f"attention=global runs on one rank, but parallel.nproc={cfg.parallel.nproc}; use "
                          "attention=ring (exact) or attention=star across ranks, or parallel.tp="
                          f"{cfg.parallel.nproc} (tensor parallel on one host)")  # fmt: skip
    if name != "star":
        return
    block = whole(cfg, "attention.params.block_size", none=True)
    anchor = whole(cfg, "attention.params.anchor_size", none=True)
    choice(cfg, "attention.params.anchor_mode", ANCHOR_MODES)
    whole(cfg, "attention.min_block_size", low=0, none=True)
    if block is not None and anchor is not None and anchor > block:
        raise OptionError(f"attention.params.anchor_size={anchor} is larger than block_size={block}; use at most the block")
    # the shortest context the task feeds: ruler's task.lengths where given, else ctx.length
    # (lengths that are not positive whole numbers get their own error from the task's checks)
    lengths = cfg.task.get("lengths") if cfg.task.get("name") == "ruler" else None
    name, n = ("task.lengths", min(lengths)) if _token_counts(lengths) else ("ctx.length", cfg.ctx.length)
    if block is not None and -(-n // block) < hosts:
        where = f"parallel.nproc={cfg.parallel.nproc}" + (f" / parallel.tp={cfg.parallel.tp} = {hosts} hosts" if cfg.parallel.tp > 1 else "")
        raise OptionError(f"attention.params.block_size={block} cuts {name}={n} into {-(-n // block)} blocks, fewer "
                          f"than {where}; use a smaller block_size or fewer ranks")  # fmt: skip


def _token_counts(lengths) -> bool:
    """Whether `lengths` is a non-empty list of positive whole numbers (ruler's task.lengths)."""
    return bool(lengths) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)


def _check_decode(cfg) -> None:
    from longctx.attention.strategy import DECODE_MODES

    params = cfg.attention.params
    if params.get("decode", "dense") not in DECODE_MODES:
        choice(cfg, "attention.params.decode", DECODE_MODES)
    if params.get("decode") != "hsr":
        return
    keys = [k for k in ("hsr_eps", "hsr_block", "hsr_sink", "hsr_recent") if k in params]
    if "hsr_eps" in keys:
        number(cfg, "attention.params.hsr_eps", 0, 1, low_open=True)
        if params.hsr_eps >= 1:
            raise OptionError(f"attention.params.hsr_eps must be below 1 (it bounds the unread share of the softmax mass); got {params.hsr_eps}")
    if "hsr_block" in keys:
        block = whole(cfg, "attention.params.hsr_block")
        if block & (block - 1) or block > cfg.ctx.length:
            raise OptionError(f"attention.params.hsr_block must be a power of two no larger than ctx.length={cfg.ctx.length}; got {block}")
    for key in ("hsr_sink", "hsr_recent"):
        if key in keys:
            whole(cfg, f"attention.params.{key}", low=0)


def _check_model(cfg) -> ModelArgs:
    from longctx.preflight.memory import preset_args

    path = text(cfg, "model.path")
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise OptionError(f"model.path={p} does not exist; point it at a Hugging Face checkpoint directory")
        if not p.is_dir():
            raise OptionError(f"model.path={p} is a file; point it at the directory that holds config.json, the "
                              "*.safetensors files and the tokenizer")  # fmt: skip
        if not (p / "config.json").is_file():
            raise OptionError(f"model.path={p} has no config.json; is it a Hugging Face checkpoint directory? "
                              "(`python tools/convert.py` makes one from GGUF or Meta checkpoints)")  # fmt: skip
    if path is None and not cfg.model.get("builtin") and cfg.task.name in ("generate", "ruler"):
        raise OptionError(
            f"model preset {cfg.model.name!r} names no checkpoint, and task={cfg.task.name} needs real weights. Point "
            "it at a Hugging Face directory (config.json, *.safetensors, tokenizer) with model.path=/path/to/dir, or make "
            "one with `python tools/convert.py gguf|meta|hf ...`"
        )
    try:
        return preset_args(cfg.model)
    except ValueError as e:
        raise OptionError(f"model={cfg.model.name}: {e}") from None


def _check_tensor_parallel(cfg, args: ModelArgs) -> None:
    from longctx.parallel.tensor import check_degree

    try:
        check_degree(args, cfg.parallel.tp, f"model={cfg.model.name}")
    except ValueError as e:
        raise OptionError(str(e)) from None


def _check_generate(cfg) -> None:
    whole(cfg, "task.max_new_tokens")
    number(cfg, "task.temperature", 0)
    whole(cfg, "task.top_k", none=True)
    number(cfg, "task.top_p", 0, 1, low_open=True, none=True)
    strings(cfg, "task.stop")
    flag(cfg, "task.chat")
    flag(cfg, "task.resume")
    prompt, prompt_file, jsonl = text(cfg, "task.prompt"), text(cfg, "task.prompt_file"), text(cfg, "task.input_jsonl")
    given = [k for k, v in (("task.prompt", prompt), ("task.prompt_file", prompt_file), ("task.input_jsonl", jsonl)) if v is not None]
    if len(given) > 1:
        raise OptionError(f"{' and '.join(given)} are both set; give one prompt source")
    if prompt_file not in (None, "-"):
        input_file(cfg, "task.prompt_file")
    if jsonl is not None:
        jsonl_records(input_file(cfg, "task.input_jsonl"), "task.input_jsonl")
    choice(cfg, "task.on_error", ("skip", "stop"))
    out = results_file(cfg, "task.output_jsonl")
    if out is not None and jsonl is not None and Path(jsonl).expanduser().resolve() == out.resolve():
        raise OptionError("task.output_jsonl is the input file task.input_jsonl; name another file")


def _check_ruler(cfg) -> None:
    from longctx.evaluation import ruler

    whole(cfg, "task.max_new_tokens")
    whole(cfg, "task.samples")
    flag(cfg, "task.chat")
    flag(cfg, "task.resume")
    for task in strings(cfg, "task.tasks"):
        if task not in ruler.TASKS:
            raise OptionError(f"task.tasks: unknown RULER task {task!r}; available: {', '.join(ruler.TASKS)}")
    lengths = _get(cfg, "task.lengths")
    if lengths is not None and not _token_counts(lengths):
        raise OptionError(f"task.lengths must be a list of positive token counts (or null for ctx.length); got {lengths!r}")
    depths = _get(cfg, "task.depths")
    if not depths or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
        raise OptionError(f"task.depths are fractions of the context, each in [0, 1]; got {depths!r}")
    choice(cfg, "task.haystack", ("prose", "noise"))
    if text(cfg, "task.haystack_file") is not None:
        path = Path(cfg.task.haystack_file).expanduser()
        if not path.exists():
            raise OptionError(f"task.haystack_file={path}: no such file or folder")
    results_file(cfg, "task.output_jsonl")


def _check_bench(cfg) -> None:
    prompt = whole(cfg, "task.prompt_tokens", none=True)
    query = whole(cfg, "task.query_tokens")
    whole(cfg, "task.new_tokens")
    n = prompt or cfg.ctx.length
    if query >= n:
        raise OptionError(f"task.query_tokens={query} leaves no context in a prompt of {n} tokens; use fewer query tokens")
    if cfg.task.name == "bench":
        whole(cfg, "task.warmup", low=0)
        whole(cfg, "task.repeats")


def _check_positions(cfg, args: ModelArgs) -> None:
    """Tasks that answer must fit the model's positions, unless the user accepts extrapolation."""
    if cfg.task.name not in ("generate", "ruler") or flag(cfg, "model.extrapolate"):
        return
    n = max(_get(cfg, "task.lengths") or [cfg.ctx.length]) if cfg.task.name == "ruler" else cfg.ctx.length
    new = cfg.task.max_new_tokens
    if cfg.task.name == "generate" and (cfg.task.prompt is not None or cfg.task.prompt_file or cfg.task.input_jsonl):
        n = 0  # the prompt's own length is checked once it is tokenized (`check_prompt_length`)
    elif cfg.task.name == "generate" and n <= args.max_seq_len and demo_context(n, args.max_seq_len, new) > 0:
        return  # the demo fills the model's window, leaving room for its question and answer
    if n + new > args.max_seq_len:
        raise OptionError(
            f"ctx.length={n} plus task.max_new_tokens={new} is past the {args.max_seq_len} positions "
            f"{cfg.model.name} was trained for; use ctx <= {args.max_seq_len - new}, or model.extrapolate=true to run "
            "past them anyway (answers degrade)"
        )


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
