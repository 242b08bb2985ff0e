"""task=generate: one prompt (text, file, stdin or the pass-key demo), or every record of a jsonl file."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from longctx import models
from longctx.conf.schema import OptionError, option
from longctx.models.config import ModelArgs
from longctx.models.tokenizer import Tokenizer
from longctx.preflight import options
from longctx.tasks import rows
from longctx.tasks.context import Context, local_tokenizer, prompt_ids, text_ids


@dataclass
class GenerateOptions(models.SamplingOptions):
    prompt: str | None = option(None, "the prompt's text")
    prompt_file: str | None = option(None, "a UTF-8 text file holding the prompt; - for stdin")
    input_jsonl: str | None = option(None, "records {input_context, input_query, output}, one JSON object a line")
    output_jsonl: str | None = option(
        None, "each answer is appended as it is made; null: answers.jsonl in the run directory"
    )
    resume: bool = option(False, "skip the records output_jsonl already answers")
    on_error: str = option(
        "skip", "a record that cannot run (too long): skip (reported, counted) or stop", choices=("skip", "stop")
    )
    chat: bool = option(True, "wrap prompts in the model's chat template")
    max_new_tokens: int = option(48, "tokens generated at most", low=1)
    stop: list[str] = option(doc="stop strings", factory=list)


# The task's options that change an answer (an answers file records them: tasks/rows.py).
ANSWER_OPTIONS = ("chat", "max_new_tokens", "temperature", "top_k", "top_p", "stop")


def answers_made(cfg: DictConfig) -> dict:
    """What the answers to task.input_jsonl under these options are made from (an answers file's header)."""
    return rows.made_from(cfg, ANSWER_OPTIONS, {"task.input_jsonl": Path(cfg.task.input_jsonl).expanduser()})


def check(cfg: DictConfig, args: ModelArgs) -> None:
    """One prompt source at most; its files readable; the output writable and, to resume, made from the same input
    and options; the demo within the model's positions."""
    t = cfg.task
    given = [k for k in ("prompt", "prompt_file", "input_jsonl") if t[k] is not None]
    if len(given) > 1:
        raise OptionError(f"{' and '.join(f'task.{k}' for k in given)} are both set; give one prompt source")
    if t.prompt is not None and not t.prompt.strip():
        raise OptionError("task.prompt is empty; give the prompt's text")
    if t.prompt_file not in (None, "-"):
        if not options.read_text(options.input_file(cfg, "task.prompt_file"), "task.prompt_file").strip():
            raise OptionError(f"task.prompt_file={t.prompt_file} is empty; give the prompt's text")
    if t.input_jsonl is not None:
        options.jsonl_records(options.input_file(cfg, "task.input_jsonl"), "task.input_jsonl")
    out = options.output_file(cfg, "task.output_jsonl")
    if out is not None and t.input_jsonl is not None and Path(t.input_jsonl).expanduser().resolve() == out.resolve():
        raise OptionError("task.output_jsonl is the input file task.input_jsonl; name another file")
    options.results_file(cfg, "task.output_jsonl")
    if out is not None and t.input_jsonl is not None and t.resume:
        rows.check_resumable(out, "task.output_jsonl", answers_made(cfg))
    if cfg.parallel.nproc > cfg.parallel.tp:  # several hosts: each prompt must reach every one (ranks not started yet)
        _check_layouts(cfg)
    # a prompt's own length is checked once it is tokenized (`check_prompt_length`); the demo fills the model's
    # window where ctx.length is longer, leaving room for its question and answer
    n = cfg.ctx.length
    if not given and not (n <= args.max_seq_len and options.demo_context(n, args.max_seq_len, t.max_new_tokens) > 0):
        options.check_positions(cfg, args, n, "ctx.length")


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
            text = options.text_of(sys.stdin.buffer.read(), "task.prompt_file=- (standard input)")
        else:
            text = (
                options.read_text(Path(t.prompt_file).expanduser(), "task.prompt_file") if t.prompt_file else t.prompt
            )
        if not text.strip():
            raise OptionError(f"{source} is empty; give the prompt's text")
        ids, n_ctx = text_ids(c.tok, text, t.chat)
        options.check_prompt_length(len(ids), t.max_new_tokens, c.max_seq_len, source)
    else:
        n_demo = options.demo_context(c.cfg.ctx.length, c.max_seq_len, t.max_new_tokens)
        if n_demo < c.cfg.ctx.length:
            c.say(
                f"demo context of {n_demo} tokens: ctx.length={c.cfg.ctx.length} would leave no room for the question "
                f"and {t.max_new_tokens} new tokens in the model's {c.max_seq_len} positions"
            )
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
    result = {
        "prompt_tokens": len(ids),
        "new_tokens": len(out.token_ids),
        "ttft_s": ttft,
        "decode_tok_s": tps,
        "kv_bytes_per_rank": kv,
        "answer": out.text,
    }
    result |= c.decode_report()
    if expected is not None:
        result["demo_fact_found"] = expected in out.text
        c.say(f"hidden pass key {expected}: {'found' if result['demo_fact_found'] else 'NOT found'} in the answer")
    return result


def _check_layouts(cfg: DictConfig) -> None:
    """Each given prompt's context (task.prompt, task.prompt_file, every record of task.input_jsonl) against the
    strategy's layout over the hosts, where the tokenizer is on disk already (standard input is read later)."""
    t = cfg.task
    given = t.prompt is not None or t.prompt_file not in (None, "-") or t.input_jsonl is not None
    tok = local_tokenizer(cfg.model) if given else None
    if tok is None:
        return
    if t.prompt is not None or t.prompt_file not in (None, "-"):
        text = (
            t.prompt
            if t.prompt is not None
            else options.read_text(Path(t.prompt_file).expanduser(), "task.prompt_file")
        )
        what = "task.prompt" if t.prompt is not None else f"task.prompt_file={t.prompt_file}"
        options.check_layout(cfg, text_ids(tok, text, t.chat)[1], what)
    if t.input_jsonl is not None:
        for line, rec in options.jsonl_records(Path(t.input_jsonl).expanduser(), "task.input_jsonl"):
            n_ctx = prompt_ids(tok, rec["input_context"], rec["input_query"], t.chat)[1]
            options.check_layout(cfg, n_ctx, f"{t.input_jsonl}:{line}")


def _fits(c: Context, rec: dict, where: str) -> bool:
    """Whether a record's prompt leaves room for its answer in the model's positions; if not, said (`where`: its
    FILE:LINE) and False, or with task.on_error=stop the run stops."""
    ids, _ = c.prompt_ids(rec["input_context"], rec["input_query"], c.cfg.task.chat)
    try:
        options.check_prompt_length(len(ids), c.cfg.task.max_new_tokens, c.max_seq_len, where)
    except OptionError as e:
        if c.cfg.task.on_error == "stop":
            raise
        c.say(f"skipped: {e}")
        return False
    return True


def generate_jsonl(c: Context, sampling: models.Sampling) -> dict:
    """Answer every record of task.input_jsonl. Each answer is appended to the output as it is made, so a crash loses
    only the record in flight, and task.resume=true skips the records already answered there. A record that cannot
    run (longer than the model's positions) is reported by index and skipped, or stops the run with
    task.on_error=stop; the summary counts them."""
    from tqdm import tqdm

    t = c.cfg.task
    records = options.jsonl_records(Path(t.input_jsonl).expanduser(), "task.input_jsonl")
    made = answers_made(c.cfg)
    out_path, held = c.results("answers.jsonl", made)
    done = {r.get("index"): r for r in held}
    if done:
        c.say(f"resuming: {len(done)} of {len(records)} records already answered in {out_path}")
    # every record's length first: one past the model's positions stops the run (on_error=stop) before the weights load
    failed = []
    for i, (line, rec) in enumerate(records):
        if i not in done and not _fits(c, rec, f"{t.input_jsonl}:{line}"):
            failed.append(i)
    answers = []
    with c.results_writer(out_path, made) as writer:
        for i, (line, rec) in enumerate(tqdm(records, desc="samples", disable=not c.lead or None)):
            if i in done:
                answers.append(done[i])
                continue
            if i in failed:
                continue
            ids, n_ctx = c.prompt_ids(rec["input_context"], rec["input_query"], t.chat)
            out, ttft, _ = c.answer(ids, n_ctx, t.max_new_tokens, sampling, t.stop)
            row = {"index": i, "line": line, "pred": out.text, "output": rec.get("output")}
            row |= {"prompt_tokens": len(ids), "ttft_s": ttft}
            answers.append(row)
            if writer is not None:
                writer.append(row)
    lines = [records[i][0] for i in failed]
    c.say(
        f"{len(answers)} answers in {out_path}"
        + (f"; {len(failed)} records failed, at lines {lines}" if failed else "")
    )
    c.samples = answers
    timed = [r["ttft_s"] for r in answers]
    return {
        "samples": len(answers),
        "failed": len(failed),
        "failed_indices": failed,
        "failed_lines": lines,
        "mean_ttft_s": sum(timed) / len(timed) if timed else None,
        "answers_file": str(out_path),
    }
