"""The command line: `python runner.py model=llama3 attention=star ctx=1m [task=...] [parallel.nproc=N]`.

A Hydra app over conf/. With no arguments it runs the built-in default on CPU: SmolLM2-135M-Instruct (made by
`tools/convert.py smollm2` on first use) with star attention answering a question about a pass key hidden in a
long document, then prints the time to first token, decode speed and the KV bytes each rank holds.

Each run's directory (outputs/DATE/TIME, or multirun/... for -m) holds the resolved config (.hydra/) and
results.json; W&B logs go to an offline run by default.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import attention
import models
from models.tokenizer import Tokenizer
from models.transformer import Transformer
from parallel.launch import RankFailed, init_ranks, launch, under_torchrun
from parallel.layout import Layout, make_layout
from preflight import memory, options


# --- configuration


def validate(cfg: DictConfig) -> None:
    """Errors a user can fix, caught before any process or model is started (preflight.options has the checks)."""
    options.check(cfg, (*TASKS, "plan"))
    if cfg.task.name == "bench" and cfg.task.new_tokens < BENCH_SETUP_STEPS + 2:
        raise ValueError(
            f"task.new_tokens={cfg.task.new_tokens} leaves no decode step to time: bench times decode after the first "
            f"token and {BENCH_SETUP_STEPS} set-up steps; use task.new_tokens >= {BENCH_SETUP_STEPS + 2}"
        )


def build_model(preset: DictConfig, dtype: torch.dtype, device: torch.device, layout: Layout) -> tuple[Transformer, Tokenizer | None]:
    """The preset's checkpoint (or the built-in one); without one, random weights of its shape (`validate` allows that
    only for tasks that measure speed). With tensor parallelism, this rank's slices of it only.

    The model starts with a placeholder strategy; each task sets the real one once it knows the context length.
    """
    placeholder = attention.build("ring")  # valid on any number of ranks
    path = preset.get("path")
    if path is None and preset.get("builtin"):
        from tools.convert import BUILTINS

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


# --- tasks


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
        steps = self.model.attention.hsr_steps
        if not steps:
            return {}
        share = sum(s["blocks_read"] for s in steps) / max(1, sum(s["blocks_visible"] for s in steps))
        worst = max(s["certificate"] for s in steps)
        self.say(f"hsr: phase 2 read {share:.1%} of the key blocks; unread softmax mass at most {worst:.2e} of the read")
        return {"hsr_blocks_read_share": share, "hsr_max_certificate": worst}

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


def demo_prompt(tokenizer: Tokenizer, n_tokens: int, seed: int) -> tuple[str, str, str]:
    """Pass-key retrieval: a context of about `n_tokens` tokens with the key at a random depth, the question, the key."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    reps = max(1, n_tokens // len(tokenizer.encode(filler, add_special_tokens=False)))
    parts = [filler] * reps
    parts.insert(rng.randrange(reps), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    intro = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
    return f"{intro}\n\n{''.join(parts)}", "\n\nWhat is the pass key?", key


def _sampling(task: DictConfig, seed: int) -> models.Sampling:
    return models.Sampling(task.temperature, task.top_k, task.top_p, seed)


def task_generate(c: Context) -> dict:
    t = c.cfg.task
    sampling = _sampling(t, c.cfg.seed)
    if t.input_jsonl:
        return generate_jsonl(c, sampling)
    expected = None
    if t.prompt_file or t.prompt is not None:
        source = "task.prompt" if t.prompt is not None else f"task.prompt_file={t.prompt_file}"
        if t.prompt_file == "-":
            text = sys.stdin.read()
        else:
            text = options.read_text(Path(t.prompt_file).expanduser(), "task.prompt_file") if t.prompt_file else t.prompt
        if t.chat and c.tok.chat_template:
            ids = c.tok.encode_chat([{"role": "user", "content": text}])
        else:
            ids = c.tok.encode(text)
        n_ctx = len(ids) - 1
        options.check_prompt_length(len(ids), t.max_new_tokens, c.max_seq_len, source)
    else:
        n_demo = options.demo_context(c.cfg.ctx.length, c.max_seq_len, t.max_new_tokens)
        if n_demo < c.cfg.ctx.length:
            c.say(f"demo context of {n_demo} tokens: ctx.length={c.cfg.ctx.length} would leave no room for the question "
                  f"and {t.max_new_tokens} new tokens in the model's {c.max_seq_len} positions")  # fmt: skip
        context, query, expected = demo_prompt(c.tok, n_demo, c.cfg.seed)
        ids, n_ctx = c.prompt_ids(context, query, t.chat)
        options.check_prompt_length(len(ids), t.max_new_tokens, c.max_seq_len, "the demo prompt")
    out, ttft, tps = c.answer(ids, n_ctx, t.max_new_tokens, sampling, t.stop, stream=True)
    kv = c.kv_per_rank()
    strategy = c.cfg.attention.name
    c.say(
        f"[{c.cfg.model.name} · {strategy} · {c.layout.describe()} · {c.device.type}] prompt "
        f"{len(ids)} tokens · time to first token {ttft:.2f} s · decode {tps:.1f} tok/s · KV cache per rank: "
        + ", ".join(f"{b / 2**20:.1f} MiB" for b in kv)
    )
    result = {"prompt_tokens": len(ids), "new_tokens": len(out.token_ids), "ttft_s": ttft, "decode_tok_s": tps,
              "kv_bytes_per_rank": kv, "answer": out.text}  # fmt: skip
    result |= c.hsr_summary()
    if expected is not None:
        result["demo_fact_found"] = expected in out.text
        c.say(f"hidden pass key {expected}: {'found' if result['demo_fact_found'] else 'NOT found'} in the answer")
    return result


def generate_jsonl(c: Context, sampling: models.Sampling) -> dict:
    """Answer every record of task.input_jsonl. Each answer is appended to the output as it is made, so a crash loses
    only the record in flight, and task.resume=true skips the records already answered there. A record that cannot
    run (longer than the model's positions) is reported by index and skipped, or stops the run with
    task.on_error=stop; the summary counts them."""
    from tqdm import tqdm

    t = c.cfg.task
    records = options.jsonl_records(Path(t.input_jsonl).expanduser(), "task.input_jsonl")
    out_path = Path(t.output_jsonl).expanduser() if t.output_jsonl else c.run_dir / "answers.jsonl"
    done = {r["index"]: r for r in _jsonl_rows(out_path)} if t.resume else {}
    if done:
        c.say(f"resuming: {len(done)} of {len(records)} records already answered in {out_path}")
    rows, failed = [], []
    for i, rec in enumerate(tqdm(records, desc="samples", disable=not c.lead or None)):
        if i in done:
            rows.append(done[i])
            continue
        ids, n_ctx = c.prompt_ids(rec["input_context"], rec["input_query"], t.chat)
        try:
            options.check_prompt_length(len(ids), t.max_new_tokens, c.max_seq_len, f"task.input_jsonl={t.input_jsonl}, record {i}")
        except options.OptionError as e:
            if t.on_error == "stop":
                raise
            failed.append(i)
            c.say(f"skipped: {e}")
            continue
        out, ttft, _ = c.answer(ids, n_ctx, t.max_new_tokens, sampling, t.stop)
        row = {"index": i, "pred": out.text, "output": rec.get("output"), "prompt_tokens": len(ids), "ttft_s": ttft}
        rows.append(row)
        if c.lead:
            _append_row(out_path, row)
    c.say(f"{len(rows)} answers in {out_path}" + (f"; {len(failed)} records failed: {failed}" if failed else ""))
    c.samples = rows
    timed = [r["ttft_s"] for r in rows]
    return {"samples": len(rows), "failed": len(failed), "failed_indices": failed,
            "mean_ttft_s": sum(timed) / len(timed) if timed else None, "answers_file": str(out_path)}  # fmt: skip


def _jsonl_rows(path: Path) -> list[dict]:
    """The rows of a results jsonl this runner wrote (a torn last line, from a killed run, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def task_ruler(c: Context) -> dict:
    """RULER-style tasks; each sample's row is appended to task.output_jsonl as it finishes, and with
    task.resume=true the samples already there are not run again (a killed run goes on where it stopped)."""
    from tqdm import tqdm

    from evaluation import ruler

    t = c.cfg.task
    lengths = list(t.lengths or [c.cfg.ctx.length])
    count = lambda text: len(c.tok.encode(text, add_special_tokens=False))  # noqa: E731
    hay = ruler.Haystack() if t.haystack == "noise" else ruler.Haystack.from_file(t.haystack_file or ruler.DEFAULT_PROSE)
    samples = ruler.make_samples(list(t.tasks), count, lengths, list(t.depths), t.samples, hay)
    out_path = Path(t.output_jsonl).expanduser() if t.output_jsonl else c.run_dir / "ruler_samples.jsonl"
    done = {r["key"]: r for r in _jsonl_rows(out_path) if r.get("haystack") == hay.name} if t.resume else {}
    rows = [done[s.key] for s in samples if s.key in done]
    todo = [s for s in samples if s.key not in done]
    if done:
        c.say(f"resuming: {len(rows)} of {len(samples)} samples already in {out_path}")
    for s in tqdm(todo, desc="ruler samples", disable=not c.lead or None):
        ids, n_ctx = c.prompt_ids(s.context, s.query, t.chat)
        out, ttft, _ = c.answer(ids, n_ctx, t.max_new_tokens, models.Sampling())
        row = {"key": s.key, "task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed,
               "score": ruler.score(out.text, s.answers), "pred": out.text, "answers": s.answers,
               "prompt_tokens": len(ids), "ttft_s": ttft, "haystack": hay.name, "strategy": c.strategy_params()}  # fmt: skip
        rows.append(row)
        if c.lead:
            _append_row(out_path, row)
    c.samples = rows
    if not c.lead:
        return {}
    text = ruler.table(rows)
    print(text, flush=True)
    (c.run_dir / "ruler_table.txt").write_text(text + "\n")
    plot = ruler.heatmap(rows, c.run_dir / "ruler_heatmap.png") if any(r["depth"] is not None for r in rows) else None
    per_task = {f"ruler/{task}": sum(r["score"] for r in rows if r["task"] == task) / sum(r["task"] == task for r in rows)
                for task in dict.fromkeys(r["task"] for r in rows)}  # fmt: skip
    return {"ruler/mean": sum(r["score"] for r in rows) / len(rows), **per_task, "plot": str(plot) if plot else None,
            "samples_file": str(out_path)}  # fmt: skip


# Decode steps bench leaves out of the decode rate: on CUDA the first runs eagerly and the second captures the CUDA
# graph that later steps replay (models.cuda_graph).
BENCH_SETUP_STEPS = 2


def task_bench(c: Context) -> dict:
    t = c.cfg.task
    n = t.prompt_tokens or c.cfg.ctx.length
    gen = torch.Generator().manual_seed(c.cfg.seed)
    ids = torch.randint(0, c.model.args.vocab_size, (n,), generator=gen).tolist()
    n_ctx = max(1, n - t.query_tokens)
    if c.tok is None:
        c.say(f"{c.cfg.model.name}: no checkpoint, benchmarking random weights of its shape")

    def once() -> tuple[float, float]:
        c.model.attention = c.strategy(n_ctx)
        c.describe_blocks(n_ctx)
        sync()
        start = time.perf_counter()
        it = models.generate_tokens(c.model, ids, t.new_tokens, max_seq_len=c.max_seq_len, context_len=n_ctx)
        next(it)
        sync()
        first = time.perf_counter()
        for _ in itertools.islice(it, BENCH_SETUP_STEPS):
            pass
        sync()
        steady = time.perf_counter()
        rest = sum(1 for _ in it)
        sync()
        end = time.perf_counter()
        return first - start, rest / (end - steady) if rest else float("nan")

    def sync() -> None:
        if c.device.type == "cuda":
            torch.cuda.synchronize()
        if c.world > 1:
            dist.barrier()

    for _ in range(t.warmup):
        once()
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(t.repeats)]
    ttft = min(r[0] for r in runs)
    decode = max(r[1] for r in runs)
    host_peaks = gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, c.world)  # loading included
    peaks = gather(torch.cuda.max_memory_allocated(), c.world) if c.device.type == "cuda" else host_peaks
    planned = memory.plan_config(c.cfg)
    planned_peaks = [r.total + (0 if c.device.type == "cuda" else memory.RUNTIME_BYTES["cpu"]) for r in planned.ranks]
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": c.cfg.model.name, "attention": c.cfg.attention.name,
        "ctx": n, "ranks": c.world, "hosts": c.layout.hosts, "tp": c.layout.tp, "device": torch.cuda.get_device_name() if c.device.type == "cuda" else "cpu",
        "dtype": str(c.dtype).removeprefix("torch."), "torch": torch.__version__, "random_weights": c.tok is None,
        "ttft_s": ttft, "prefill_tok_s": n / ttft, "decode_tok_s": decode,
        "peak_mem_bytes_per_rank": peaks, "peak_mem_kind": "cuda allocated" if c.device.type == "cuda" else "process max RSS",
        "planned_peak_bytes_per_rank": planned_peaks, "peak_host_bytes_per_rank": host_peaks,
        **{k: v for k, v in c.strategy_params().items() if k in ("block_size", "anchor_size", "anchor_mode")},
    }  # fmt: skip
    if c.lead:
        path = Path(t.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        c.say(f"time to first token {ttft:.3f} s · prefill {n / ttft:.0f} tok/s · decode {decode:.1f} tok/s · "
              f"peak memory per rank {', '.join(f'{p / 2**30:.2f} GiB' for p in peaks)} (planned "
              f"{', '.join(f'{p / 2**30:.2f}' for p in planned_peaks)}) · peak host memory per rank "
              f"{', '.join(f'{p / 2**30:.2f} GiB' for p in host_peaks)} → {path}")  # fmt: skip
    return record


def task_plan(cfg: DictConfig, run_dir: Path) -> None:
    """Print the memory plan per rank and term; nothing is loaded and no GPU is touched."""
    plan = memory.plan_config(cfg)
    print(plan.table(), flush=True)
    if cfg.memory.limit_gib is not None:  # the verdict the run would get on ranks of that size
        try:
            memory.check_fits(cfg, torch.device("cpu"))
            print(f"fits: {plan.need / 2**30:.1f} of memory.limit_gib={cfg.memory.limit_gib} GiB per rank")
        except memory.DoesNotFit as e:
            print(f"does not fit: {e}")
    result = {"peak_bytes": plan.peak, "need_bytes": plan.need, "ranks": [r.terms for r in plan.ranks]}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")


TASKS = {"generate": task_generate, "ruler": task_ruler, "bench": task_bench}


# --- running, on one rank or many


def report(cfg: DictConfig, run_dir: Path, result: dict, samples: list[dict]) -> None:
    """results.json in the run directory, and the W&B run (offline unless configured otherwise)."""
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    run = wandb.init(
        mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
        config=OmegaConf.to_container(cfg, resolve=True), dir=os.environ.get("WANDB_DIR") or str(run_dir),
        name=f"{cfg.task.name}-{cfg.model.name}-{cfg.attention.name}-{cfg.ctx.name}",
    )  # fmt: skip
    run.log({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if samples:
        columns = list(samples[0])
        run.log({"samples": wandb.Table(columns=columns, data=[[json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in columns] for r in samples])})
    if result.get("plot"):
        run.log({"ruler_heatmap": wandb.Image(result["plot"])})
    run.finish()


def worker(cfg_dict: dict, run_dir: str) -> dict:
    """One rank's whole run. Rank 0 writes results.json and the W&B run, and returns the result."""
    cfg = OmegaConf.create(cfg_dict)
    rank, _, device = init_ranks(cfg.parallel.backend, cfg.parallel.timeout_s)
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    layout = make_layout(cfg.parallel.tp, device)
    if rank:
        os.environ["TQDM_DISABLE"] = "1"
    torch.manual_seed(cfg.seed)
    try:
        if cfg.memory.check:  # self-launched GPU ranks: each checks its own GPU before loading
            memory.check_fits(cfg, device)
        c = Context(cfg, Path(run_dir), rank, layout, device)
        result = TASKS[cfg.task.name](c)
        if rank == 0:
            report(cfg, Path(run_dir), result, c.samples)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if under_torchrun():
            options.take_launcher_world(cfg, int(os.environ["WORLD_SIZE"]))
        validate(cfg)
        if cfg.task.name == "plan":
            task_plan(cfg, Path(run_dir))
            return
        # Self-launched GPU ranks check their own GPUs (asking here would hold a CUDA context on each meanwhile).
        in_ranks = cfg.parallel.nproc > 1 and not under_torchrun() and options.resolve_device(cfg.device).type == "cuda"
        if cfg.memory.check and not in_ranks:
            memory.check_fits(cfg, options.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))))
        container = OmegaConf.to_container(cfg, resolve=True)
        container["memory"]["check"] = cfg.memory.check and in_ranks  # what is left for the ranks to check
        if cfg.parallel.nproc > 1 and not under_torchrun():
            launch(cfg.parallel.nproc, worker, container, run_dir)
        else:
            worker(container, run_dir)
    except Exception as e:  # the one error boundary: one line naming the input at fault; the traceback on request
        if os.environ.get("LONGCTX_TRACEBACK"):
            raise
        known = isinstance(e, (ValueError, OSError, RankFailed))
        message = " ".join(str(e).split()) if known else f"{type(e).__name__}: {' '.join(str(e).split())}"
        print(f"error: {message} (LONGCTX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2 if known else 1)


class MultirunComparison(Callback):
    """After `python runner.py -m ...`, one table comparing every job's results."""

    KEYS = ("ttft_s", "decode_tok_s", "prefill_tok_s", "ruler/mean", "demo_fact_found")

    @staticmethod
    def _overrides(job_dir: Path) -> list[str]:
        path = job_dir / ".hydra" / "overrides.yaml"
        return list(OmegaConf.load(path)) if path.is_file() else []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        labels = [self._overrides(job.parent) for job in jobs]
        shared = set.intersection(*(set(o) for o in labels)) if labels else set()
        rows = [
            [" ".join(o for o in overrides if o not in shared) or job.parent.name]
            + [_cell(json.loads(job.read_text()).get(k)) for k in self.KEYS]
            for job, overrides in zip(jobs, labels)
        ]
        if not rows:
            return
        header = ["job", *self.KEYS]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header, *rows]]
        text = "\n".join(lines)
        (sweep / "comparison.txt").write_text(text + "\n")
        print(f"\n{text}\n(also in {sweep / 'comparison.txt'})")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    main()
