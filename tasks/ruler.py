"""task=ruler: RULER's 13 tasks from NVIDIA's own generator (evaluation/ruler.py), scored by its metrics, per task
and length, with the mean over the tasks as the headline."""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from longctx import models
from longctx.conf.schema import OptionError, option
from longctx.evaluation import ruler
from longctx.models.config import ModelArgs
from longctx.models.tokenizer import Tokenizer
from longctx.preflight import options
from longctx.tasks import rows as results
from longctx.tasks.context import Context, local_tokenizer, prompt_ids


def _tasks(names: list[str]) -> str | None:
    if not names:
        return "{key} names no task; leave it out for all 13"
    problem = ruler.check_tasks(names)
    return "{key}: " + problem if problem else None


def _lengths(lengths: list) -> str | None:
    if lengths and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        return None
    return "{key} must be a list of positive token counts (or null for ctx.length); got {value}"


@dataclass
class RulerOptions:
    tasks: list[str] = option(
        doc="RULER tasks to run (default: all 13)", factory=lambda: list(ruler.TASKS), check=_tasks
    )
    lengths: list[int] | None = option(
        None, "lengths to test, prompt and answer tokens as RULER counts them; null: ctx.length", check=_lengths
    )
    samples: int = option(2, "samples per task and length: the first of the generator's stream for the seed", low=1)
    seed: int = option(ruler.SEED, "the generator's random seed (42: what the package's prepare.py uses)", low=0)
    max_new_tokens: int = option(128, "tokens generated at most per answer; each task stops at its own first", low=1)
    chat: bool = option(True, "instruct models (a chat template) get it, with the answer prefix after it")
    output_jsonl: str | None = option(
        None, "each sample's row, appended as it finishes; null: ruler_samples.jsonl in the run directory"
    )
    resume: bool = option(False, "skip the samples output_jsonl already holds")


# The task's options that change an answer (a samples file records them: tasks/rows.py).
ANSWER_OPTIONS = ("chat", "max_new_tokens", "seed")
CHAT_MARGIN = 8  # tokens kept free where the chat template's tokens meet the sample's


def samples_made(cfg: DictConfig) -> dict:
    """What the sample rows under these options are made from (a samples file's header)."""
    return {
        **results.made_from(cfg, ANSWER_OPTIONS, {}),
        "generator": f"nvidia-long-context-eval {ruler.package_version()}",
    }


def _lengths_of(cfg: DictConfig) -> list[int]:
    return list(cfg.task.lengths or [cfg.ctx.length])


def template_room(tok: Tokenizer, chat: bool) -> int:
    """Tokens the chat template adds around a sample (0 for a base model), which its length must also hold."""
    if not (chat and tok.chat_template):
        return 0
    return len(prompt_ids(tok, "", "", True)[0]) + CHAT_MARGIN


def check(cfg: DictConfig, args: ModelArgs) -> None:
    """The generator is installed, the output is writable and, to resume, made from the same options, every length
    fits the model's positions and holds each task's template and answer."""
    try:
        ruler.require()
    except ruler.MissingExtra as e:
        raise OptionError(str(e)) from None
    out = options.results_file(cfg, "task.output_jsonl")
    if out is not None and cfg.task.resume:
        results.check_resumable(out, "task.output_jsonl", samples_made(cfg))
    n = max(_lengths_of(cfg))
    what = "task.lengths" if cfg.task.lengths else "ctx.length"
    if n > args.max_seq_len and not cfg.model.extrapolate:
        raise OptionError(
            f"{what}={n} is past the {args.max_seq_len} positions {cfg.model.name} was trained for (a RULER length "
            f"counts the prompt and its answer); use lengths <= {args.max_seq_len}, or model.extrapolate=true to "
            "run past them anyway (answers degrade)"
        )
    tok = local_tokenizer(cfg.model)
    if tok is not None:
        shortest = min(_lengths_of(cfg)) - template_room(tok, cfg.task.chat)
        for name in cfg.task.tasks:
            task = ruler.tasks()[name]
            need = len(tok.encode(task.template, add_special_tokens=False)) + task.tokens_to_generate
            if shortest < need:
                raise OptionError(
                    f"{what}: {min(_lengths_of(cfg))} tokens cannot hold RULER's {name} (its template and "
                    f"{task.tokens_to_generate} answer tokens take {need}); use a longer length or leave the task out"
                )


def samples(c: Context) -> list[ruler.Sample]:
    """Every task at every length: the generator's first task.samples for the seed, with the model's tokenizer."""
    t = c.cfg.task
    room = template_room(c.tok, t.chat)
    out = []
    for name in t.tasks:
        for n in _lengths_of(c.cfg):
            records = ruler.generate(name, c.path, n - room, t.samples, t.seed)
            out += [ruler.cut(ruler.tasks()[name], n, r) for r in records]
    return out


def _answer(c: Context, s: ruler.Sample) -> dict:
    """One sample answered and scored: its row."""
    ids, n_ctx = c.prompt_ids(s.context, s.question, c.cfg.task.chat, s.answer_prefix)
    new = min(c.cfg.task.max_new_tokens, ruler.tasks()[s.task].tokens_to_generate)
    # The generator sizes a sample with its own tokenization; the prompt as made here can come out a few tokens
    # longer. Such a sample keeps its prompt and answers in the positions left (an answer is a few words).
    new = max(1, min(new, c.max_seq_len - len(ids)))
    start = time.perf_counter()
    out, ttft, _ = c.answer(ids, n_ctx, new, models.Sampling())
    return {
        "key": s.key,
        "task": s.task,
        "length": s.length,
        "index": s.index,
        "score": ruler.score(s.task, out.text, s.answers),
        "pred": out.text,
        "answers": s.answers,
        "prompt_tokens": len(ids),
        "context_tokens": n_ctx,
        "max_new_tokens": new,
        "ttft_s": ttft,
        "seconds": time.perf_counter() - start,
        "strategy": c.strategy_params(),
        **(c.model.attention.decode_report() or {}),
    }


def task_ruler(c: Context) -> dict:
    """RULER's tasks; each sample's row is appended to task.output_jsonl as it finishes, and with task.resume=true
    the samples already there are not run again (a killed run goes on where it stopped)."""
    from tqdm import tqdm

    todo_all = samples(c)
    made = samples_made(c.cfg)
    out_path, held = c.results("ruler_samples.jsonl", made)
    done = {r.get("key"): r for r in held}
    rows = [done[s.key] for s in todo_all if s.key in done]
    todo = [s for s in todo_all if s.key not in done]
    if done:
        c.say(f"resuming: {len(rows)} of {len(todo_all)} samples already in {out_path}")
    with c.results_writer(out_path, made) as writer:
        for s in tqdm(todo, desc="ruler samples", disable=not c.lead or None):
            rows.append(_answer(c, s))
            if writer is not None:
                writer.append(rows[-1])
    c.samples = rows
    if not c.lead:
        return {}
    text = ruler.table(rows)
    print(text, flush=True)
    (c.run_dir / "ruler_table.txt").write_text(text + "\n")
    plot = ruler.heatmap(rows, c.run_dir / "ruler_heatmap.png")
    per_length = ruler.means(rows)
    per_task = {f"ruler/{t}": sum(r["score"] for r in rows if r["task"] == t) / sum(r["task"] == t for r in rows)
                for t in dict.fromkeys(r["task"] for r in rows)}  # fmt: skip
    return {
        "ruler/mean": sum(m["mean"] for m in per_length.values()) / len(per_length),
        **{f"ruler/mean@{n}": m["mean"] for n, m in per_length.items()},
        **per_task,
        "plot": str(plot),
        "samples_file": str(out_path),
    }
