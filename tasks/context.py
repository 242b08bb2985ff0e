"""What every task gets: the config, this rank's place in the layout, the model and tokenizer, the run directory."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from longctx import attention, models
from longctx.models.tokenizer import Tokenizer
from longctx.models.transformer import Transformer
from longctx.parallel.layout import Layout
from longctx.preflight import options


def build_model(preset: DictConfig, dtype: torch.dtype, device: torch.device, layout: Layout) -> tuple[Transformer, Tokenizer | None]:
    """The preset's checkpoint (or the built-in one); without one, random weights of its shape (`validate` allows that
    only for tasks that measure speed). With tensor parallelism, this rank's slices of it only.

    The model starts with a placeholder strategy; each task sets the real one once it knows the context length.
    """
    placeholder = attention.build("ring")  # valid on any number of ranks
    path = preset.get("path")
    if path is None and preset.get("builtin"):
        from longctx.tools.convert import BUILTINS

        if preset.builtin not in BUILTINS:
            raise ValueError(f"model.builtin={preset.builtin!r} is not a built-in model; built-in: {', '.join(BUILTINS)}")
        path = BUILTINS[preset.builtin]() if not dist.is_initialized() or dist.get_rank() == 0 else None
        if dist.is_initialized():  # rank 0 converts once; the others wait for it
            box = [str(path) if path else None]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
    if path is not None:
        path = Path(path).expanduser()
        tp = layout.tensor_parallel(models.ModelArgs.from_json(path / "config.json"))
        return models.load(path, dtype=dtype, device=device, attention=placeholder, tp=tp)
    args = models.ModelArgs.from_hf(OmegaConf.to_container(preset.config))
    return models.random_model(args, dtype=dtype, device=device, attention=placeholder, tp=layout.tensor_parallel(args)), None



class Context:
    """What a task gets: config, rank and its place in the layout, model, tokenizer, run directory."""

    def __init__(self, cfg: DictConfig, run_dir: Path, rank: int, layout: Layout, device: torch.device):
        self.cfg, self.run_dir, self.rank, self.layout, self.device = cfg, run_dir, rank, layout, device
        self.world = layout.world
        self.dtype = options.resolve_dtype(cfg.dtype, device)
        self.model, self.tok = build_model(cfg.model, self.dtype, device, layout)
        # Past the model's positions only where answers do not matter (bench) or the user accepts extrapolation.
        past = cfg.task.name == "bench" or cfg.model.get("extrapolate")
        self.max_seq_len = max(self.model.args.max_seq_len, cfg.ctx.length + 4096) if past else self.model.args.max_seq_len
        self.samples: list[dict] = []

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
        remove_progress = phase1_progress(self.model, enabled=stream and self.lead)
        first: list[float] = []

        def emit(text: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if stream and self.lead:
                print(text, end="", flush=True)

        start = time.perf_counter()
        out = models.generate(
            self.model, self.tok, ids, max_new, sampling, tuple(stop), on_text=emit,
            max_seq_len=self.max_seq_len, context_len=n_ctx,
        )  # fmt: skip
        end = time.perf_counter()
        remove_progress()
        if stream and self.lead:
            print(flush=True)
        ttft = (first[0] if first else end) - start
        n = len(out.token_ids)
        tps = (n - 1) / (end - first[0]) if first and n > 1 and end > first[0] else float("nan")
        self.kv_bytes = sum(b.numel() * b.element_size() for name, b in self.model.named_buffers() if "_cache" in name)
        return out, ttft, tps

    def hsr_summary(self) -> dict:
        """For decode=hsr: the share of key blocks phase 2 read and the largest certificate, said and returned."""
        report = self.model.attention.hsr_report()
        if report is None:
            return {}
        self.say(f"hsr: phase 2 read {report['hsr_blocks_read_share']:.1%} of the key blocks; "
                 f"unread softmax mass at most {report['hsr_max_certificate']:.2e} of the read")  # fmt: skip
        return report

    def strategy(self, n_ctx: int) -> attention.AttentionStrategy:
        """The configured strategy over the hosts (each rank in its context-parallel group)."""
        return attention.from_config(self.cfg.attention, n_ctx, self.layout.hosts, group=self.layout.cp_group)

    def strategy_params(self) -> dict:
        """The strategy of the last answer, as a results row records it."""
        s = self.model.attention
        params = {"name": s.name, "ranks": self.world, "tp": self.layout.tp}
        if s.name == "star":
            params |= {"block_size": s.block_size, "anchor_size": s.anchor_size, "anchor_mode": s.anchor_mode}
        return params

    def describe_blocks(self, n_ctx: int) -> None:
        """Say how star cut the context (once per distinct layout)."""
        s = self.model.attention
        if s.name != "star":
            return
        layout = (n_ctx, s.block_size, s.anchor_size, s.anchor_mode)
        if layout != getattr(self, "_layout", None):
            self._layout = layout
            n_blocks = -(-n_ctx // s.block_size)
            self.say(f"star: context of {n_ctx} tokens in {n_blocks} block{'s' * (n_blocks > 1)} of {s.block_size} "
                     f"over {self.layout.describe()}, anchor {min(s.anchor_size, n_ctx)} tokens "
                     f"({s.anchor_mode})")  # fmt: skip

    def prompt_ids(self, context: str, query: str, chat: bool) -> tuple[list[int], int]:
        if chat and self.tok.chat_template:
            return models.chat_prompt(self.tok, context, query)
        ctx_ids = self.tok.encode(context)
        return ctx_ids + self.tok.encode(query, add_special_tokens=False), len(ctx_ids)

    def kv_per_rank(self) -> list[int]:
        return gather(self.kv_bytes, self.world)


def phase1_progress(model: Transformer, enabled: bool):
    """A progress bar over the layers of phase-1 (context) passes, on rank 0; returns the function removing it."""
    from tqdm import tqdm

    if not enabled:
        return lambda: None
    bar = tqdm(total=len(model.layers), desc="phase 1 (context)", unit="layer", leave=False)

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
