"""What every task gets: the config, this rank's place in the layout, the model and tokenizer, the run directory."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from longctx import attention, models
from longctx.conf.schema import OptionError
from longctx.models.builtin import BUILTIN_DIRS, BUILTINS
from longctx.models.tokenizer import Tokenizer
from longctx.models.transformer import Transformer
from longctx.parallel.layout import Layout
from longctx.preflight import options
from longctx.tasks import rows


def checkpoint_path(preset: DictConfig) -> Path | None:
    """The preset's checkpoint directory, the built-in one made first where it names one (rank 0 converts once, the
    others wait for it); None: random weights of the preset's shape (`validate` allows that only for tasks that
    measure speed)."""
    path = preset.get("path")
    if path is None and preset.get("builtin"):
        path = BUILTINS[preset.builtin]() if not dist.is_initialized() or dist.get_rank() == 0 else None
        if dist.is_initialized():
            box = [str(path) if path else None]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
    return None if path is None else Path(path).expanduser()


def prompt_ids(tok: Tokenizer, context: str, query: str, chat: bool, answer_prefix: str = "") -> tuple[list[int], int]:
    """A prompt's token ids and how many of them are the context (phase 1): in the chat template where `chat` and
    the tokenizer has one, with `answer_prefix` after the assistant's header; without, right after the query."""
    if chat and tok.chat_template:
        return models.chat_prompt(tok, context, query, answer_prefix)
    ctx_ids = tok.encode(context)
    return ctx_ids + tok.encode(query + answer_prefix, add_special_tokens=False), len(ctx_ids)


def text_ids(tok: Tokenizer, text: str, chat: bool) -> tuple[list[int], int]:
    """A whole-text prompt's token ids and its context: all but the last token."""
    ids = tok.encode_chat([{"role": "user", "content": text}]) if chat and tok.chat_template else tok.encode(text)
    return ids, len(ids) - 1


def local_tokenizer(preset: DictConfig) -> Tokenizer | None:
    """The preset's tokenizer where its checkpoint is on disk already (a built-in one not made yet: None)."""
    path = preset.get("path") or (BUILTIN_DIRS.get(preset.get("builtin")) if preset.get("builtin") else None)
    path = Path(path).expanduser() if path is not None else None
    return Tokenizer.from_dir(path) if path is not None and (path / "config.json").is_file() else None


class Context:
    """What a task gets: config, rank and its place in the layout, model, tokenizer, run directory."""

    def __init__(self, cfg: DictConfig, run_dir: Path, rank: int, layout: Layout, device: torch.device):
        self.cfg, self.run_dir, self.rank, self.layout, self.device = cfg, run_dir, rank, layout, device
        self.world = layout.world
        self.dtype = options.resolve_dtype(cfg.dtype, device)
        self.path = checkpoint_path(cfg.model)
        self.overrides = dict(cfg.model.get("overrides") or {})
        self.args = (
            models.ModelArgs.from_json(self.path / "config.json", self.overrides)
            if self.path
            else models.ModelArgs.from_preset(cfg.model)
        )
        self.tok = Tokenizer.from_dir(self.path) if self.path else None
        # Past the model's positions only where answers do not matter (bench) or the user accepts extrapolation.
        past = cfg.task.name == "bench" or cfg.model.get("extrapolate")
        self.max_seq_len = max(self.args.max_seq_len, cfg.ctx.length + 4096) if past else self.args.max_seq_len
        self.samples: list[dict] = []

    @cached_property
    def model(self) -> Transformer:
        """The model, loaded on first use, so that a task checks what it can first (its prompts against the model's
        positions, the strategy against them) without waiting for the weights. With tensor parallelism, this rank's
        slices only; it starts with the default strategy, and each task sets the real one once it knows the
        context length."""
        tp = self.layout.tensor_parallel(self.args)
        if self.path is not None:
            return models.load_model(self.path, self.dtype, self.device, tp=tp, overrides=self.overrides)
        return models.random_model(self.args, dtype=self.dtype, device=self.device, tp=tp)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        if self.lead:
            print(message, file=sys.stderr, flush=True)

    def answer(self, ids: list[int], n_ctx: int, max_new: int, sampling: models.Sampling, stop=(), stream=False):
        """Generate with the configured strategy; returns (Generation, seconds to first token, decode tok/s)."""
        self.model.attention = self.strategy(n_ctx)
        self.describe_blocks(n_ctx)
        passes = sum(p is not None for p in self.model.attention.context_passes(n_ctx)) if stream and self.lead else 0
        remove_progress = phase1_progress(self.model, enabled=stream and self.lead, passes=passes)
        first: list[float] = []

        def emit(text: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if stream and self.lead:
                print(text, end="", flush=True)

        start = time.perf_counter()
        out = models.generate(
            self.model,
            self.tok,
            ids,
            max_new,
            sampling,
            tuple(stop),
            on_text=emit,
            max_seq_len=self.max_seq_len,
            context_len=n_ctx,
        )
        end = time.perf_counter()
        remove_progress()
        if stream and self.lead:
            print(flush=True)
        ttft = (first[0] if first else end) - start
        n = len(out.token_ids)
        tps = (n - 1) / (end - first[0]) if first and n > 1 and end > first[0] else float("nan")
        self.kv_bytes = self.model.cache.kv_bytes()
        return out, ttft, tps

    def decode_report(self) -> dict:
        """What the decode method did over the last phase 2 (HSR: the share of key blocks read, the largest
        certificate), said once and returned; {} where it has nothing to say."""
        report = self.model.attention.decode_report()
        if report is None:
            return {}
        self.say(self.model.attention.decode.describe(report))
        return report

    def strategy(self, n_ctx: int) -> attention.AttentionStrategy:
        """The configured strategy and decode method over the hosts (each rank in its context-parallel group)."""
        return attention.from_config(
            self.cfg.attention,
            self.cfg.decode,
            n_ctx,
            self.layout.hosts,
            group=self.layout.cp_group,
            kv_dtype=options.resolve_kv_dtype(self.cfg.kv.dtype),
            chunk=self.cfg.ctx.get("chunk"),
        )

    def strategy_params(self) -> dict:
        """The strategy of the last answer, as a results row records it."""
        s = self.model.attention
        return {
            "name": s.name,
            "ranks": self.world,
            "tp": self.layout.tp,
            **s.record(),
            "decode": s.decode.options(),
            "kv_dtype": self.cfg.kv.dtype,
            "chunk": self.cfg.ctx.get("chunk"),
        }

    def describe_blocks(self, n_ctx: int) -> None:
        """Say how the strategy laid the context out (once per distinct line)."""
        line = self.model.attention.describe(n_ctx, self.layout.describe())
        if line is not None and line != getattr(self, "_layout", None):
            self._layout = line
            self.say(line)

    def results(self, name: str, made: dict) -> tuple[Path, list[dict]]:
        """Where the task's rows go (task.output_jsonl, or `name` in the run directory) and, with task.resume=true,
        the rows already there, once the file's header says it answers `made` (tasks/rows.py). Resuming without
        task.output_jsonl goes on from the newest earlier run's file (outputs/DATE/TIME/`name`) that answers `made`."""
        t = self.cfg.task
        path = Path(t.output_jsonl).expanduser() if t.output_jsonl else self.run_dir / name
        if not t.resume:
            return path, []
        if not t.output_jsonl:
            root = self.run_dir.parent.parent
            earlier = rows.latest(root, name, made, exclude=path)
            if earlier is None:
                raise OptionError(
                    f"task.resume=true without task.output_jsonl goes on from the newest run's {name} under {root} "
                    "made from the same input and options, and there is none; name the file with task.output_jsonl="
                )
            path = earlier
        return path, rows.check_resumable(path, "task.output_jsonl", made).rows

    @contextmanager
    def results_writer(self, path: Path, made: dict) -> Iterator[rows.Writer | None]:
        """The file's one writer on the lead rank (None on the others), for as long as the task appends rows."""
        if not self.lead:
            yield None
            return
        with rows.Writer(path, "task.output_jsonl", made) as writer:
            if writer.cut:
                self.say(f"{path}: cut off a torn last line ({writer.cut} bytes) before appending")
            yield writer

    def prompt_ids(self, context: str, query: str, chat: bool, answer_prefix: str = "") -> tuple[list[int], int]:
        return prompt_ids(self.tok, context, query, chat, answer_prefix)

    def kv_per_rank(self) -> list[int]:
        return gather(self.kv_bytes, self.world)


def phase1_progress(model: Transformer, enabled: bool, passes: int = 1):
    """A progress bar over the layers of `passes` phase-1 (context) passes, on rank 0; returns the function removing
    it."""
    from tqdm import tqdm

    if not enabled:
        return lambda: None
    bar = tqdm(total=len(model.layers) * max(passes, 1), desc="phase 1 (context)", unit="layer", leave=False)

    def step(module, args, output) -> None:
        if model.attention.phase == "context":
            bar.update()
            if bar.n == bar.total:
                bar.close()  # clear the line before the answer streams

    handles = [layer.register_forward_hook(step) for layer in model.layers]

    def remove() -> None:
        bar.close()
        for h in handles:
            h.remove()

    return remove


def gather(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out
