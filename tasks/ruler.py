"""task=ruler: RULER-style samples (evaluation/ruler.py) scored per task, length and needle depth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from longctx import models
from longctx.conf.schema import OptionError, option
from longctx.evaluation import ruler
from longctx.models.config import ModelArgs
from longctx.preflight import options
from longctx.tasks import rows as results
from longctx.tasks.context import Context


def _tasks(names: list[str]) -> str | None:
    unknown = [n for n in names if n not in ruler.TASKS]
    return f"{{key}}: unknown RULER task {unknown[0]!r}; available: {', '.join(ruler.TASKS)}" if unknown else None


def _lengths(lengths: list) -> str | None:
    if lengths and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        return None
    return "{key} must be a list of positive token counts (or null for ctx.length); got {value}"


def _depths(depths: list) -> str | None:
    if depths and all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
        return None
    return "{key} are fractions of the context, each in [0, 1], at least one; got {value}"


@dataclass
class RulerOptions:
    tasks: list[str] = option(doc="RULER-style tasks to run", factory=lambda: list(ruler.TASKS), check=_tasks)
    lengths: list[int] | None = option(None, "context lengths to test; null: ctx.length", check=_lengths)
    depths: list[float] = option(
        doc="needle depths (fractions of the context) for the needle tasks",
        factory=lambda: [0.1, 0.5, 0.9],
        check=_depths,
    )
    samples: int = option(1, "samples per task, length and depth", low=1)
    max_new_tokens: int = option(48, "tokens generated at most per answer", low=1)
    chat: bool = option(True, "wrap prompts in the model's chat template")
    haystack: str = option(
        "prose",
        "prose (sentences of haystack_file, as RULER's essay variant) or noise (one repeated sentence)",
        choices=("prose", "noise"),
    )
    haystack_file: str | None = option(
        None, "a text file or a folder of them; null: the licence texts in /usr/share/common-licenses"
    )
    output_jsonl: str | None = option(
        None, "each sample's row, appended as it finishes; null: ruler_samples.jsonl in the run directory"
    )
    resume: bool = option(False, "skip the samples output_jsonl already holds")


# The task's options that change an answer (a samples file records them: tasks/rows.py).
ANSWER_OPTIONS = ("chat", "max_new_tokens", "haystack")


def samples_made(cfg: DictConfig) -> dict:
    """What the sample rows under these options are made from (a samples file's header)."""
    prose = cfg.task.haystack == "prose"
    haystack = Path(cfg.task.haystack_file).expanduser() if cfg.task.haystack_file else ruler.DEFAULT_PROSE
    return results.made_from(cfg, ANSWER_OPTIONS, {"task.haystack_file": haystack} if prose else {})


def check(cfg: DictConfig, args: ModelArgs) -> None:
    """The haystack file exists, the output is writable and, to resume, made from the same haystack and options,
    the longest length fits the model's positions."""
    if cfg.task.haystack_file is not None and not Path(cfg.task.haystack_file).expanduser().exists():
        raise OptionError(f"task.haystack_file={Path(cfg.task.haystack_file).expanduser()}: no such file or folder")
    out = options.results_file(cfg, "task.output_jsonl")
    if out is not None and cfg.task.resume:
        results.check_resumable(out, "task.output_jsonl", samples_made(cfg))
    lengths = cfg.task.lengths
    what, n = ("task.lengths", max(lengths)) if lengths else ("ctx.length", cfg.ctx.length)
    options.check_positions(cfg, args, n, what)


def _answer(c: Context, s: ruler.Sample, haystack: str) -> dict:
    """One sample answered and scored: its row."""
    ids, n_ctx = c.prompt_ids(s.context, s.query, c.cfg.task.chat)
    out, ttft, _ = c.answer(ids, n_ctx, c.cfg.task.max_new_tokens, models.Sampling())
    return {
        "key": s.key,
        "task": s.task,
        "length": s.length,
        "depth": s.depth,
        "seed": s.seed,
        "score": ruler.score(out.text, s.answers),
        "pred": out.text,
        "answers": s.answers,
        "prompt_tokens": len(ids),
        "ttft_s": ttft,
        "haystack": haystack,
        "strategy": c.strategy_params(),
        **(c.model.attention.decode_report() or {}),
    }


def task_ruler(c: Context) -> dict:
    """RULER-style tasks; each sample's row is appended to task.output_jsonl as it finishes, and with
    task.resume=true the samples already there are not run again (a killed run goes on where it stopped)."""
    from tqdm import tqdm

    t = c.cfg.task
    lengths = list(t.lengths or [c.cfg.ctx.length])
    count = lambda text: len(c.tok.encode(text, add_special_tokens=False))  # noqa: E731
    hay = (
        ruler.Haystack() if t.haystack == "noise" else ruler.Haystack.from_file(t.haystack_file or ruler.DEFAULT_PROSE)
    )
    samples = ruler.make_samples(list(t.tasks), count, lengths, list(t.depths), t.samples, hay)
    made = samples_made(c.cfg)
    out_path, held = c.results("ruler_samples.jsonl", made)
    done = {r.get("key"): r for r in held}
    rows = [done[s.key] for s in samples if s.key in done]
    todo = [s for s in samples if s.key not in done]
    if done:
        c.say(f"resuming: {len(rows)} of {len(samples)} samples already in {out_path}")
    with c.results_writer(out_path, made) as writer:
        for s in tqdm(todo, desc="ruler samples", disable=not c.lead or None):
            rows.append(_answer(c, s, hay.name))
            if writer is not None:
                writer.append(rows[-1])
    c.samples = rows
    if not c.lead:
        return {}
    text = ruler.table(rows)
    print(text, flush=True)
    (c.run_dir / "ruler_table.txt").write_text(text + "\n")
    plot = ruler.heatmap(rows, c.run_dir / "ruler_heatmap.png") if any(r["depth"] is not None for r in rows) else None
    per_task = {
        f"ruler/{task}": sum(r["score"] for r in rows if r["task"] == task) / sum(r["task"] == task for r in rows)
        for task in dict.fromkeys(r["task"] for r in rows)
    }
    return {
        "ruler/mean": sum(r["score"] for r in rows) / len(rows),
        **per_task,
        "plot": str(plot) if plot else None,
        "samples_file": str(out_path),
    }
