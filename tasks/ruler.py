"""task=ruler: RULER-style samples (evaluation/ruler.py) scored per task, length and needle depth."""

from __future__ import annotations

from pathlib import Path

from longctx import models
from longctx.tasks.context import Context
from longctx.tasks.rows import append_row, read_rows


def task_ruler(c: Context) -> dict:
    """RULER-style tasks; each sample's row is appended to task.output_jsonl as it finishes, and with
    task.resume=true the samples already there are not run again (a killed run goes on where it stopped)."""
    from tqdm import tqdm

    from longctx.evaluation import ruler

    t = c.cfg.task
    lengths = list(t.lengths or [c.cfg.ctx.length])
    count = lambda text: len(c.tok.encode(text, add_special_tokens=False))  # noqa: E731
    hay = ruler.Haystack() if t.haystack == "noise" else ruler.Haystack.from_file(t.haystack_file or ruler.DEFAULT_PROSE)
    samples = ruler.make_samples(list(t.tasks), count, lengths, list(t.depths), t.samples, hay)
    out_path = Path(t.output_jsonl).expanduser() if t.output_jsonl else c.run_dir / "ruler_samples.jsonl"
    done = {r["key"]: r for r in read_rows(out_path) if r.get("haystack") == hay.name} if t.resume else {}
    rows = [done[s.key] for s in samples if s.key in done]
    todo = [s for s in samples if s.key not in done]
    if done:
        c.say(f"resuming: {len(rows)} of {len(samples)} samples already in {out_path}")
    for s in tqdm(todo, desc="ruler samples", disable=not c.lead or None):
        ids, n_ctx = c.prompt_ids(s.context, s.query, t.chat)
        out, ttft, _ = c.answer(ids, n_ctx, t.max_new_tokens, models.Sampling())
        row = {"key": s.key, "task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed,
               "score": ruler.score(out.text, s.answers), "pred": out.text, "answers": s.answers,
               "prompt_tokens": len(ids), "ttft_s": ttft, "haystack": hay.name, "strategy": c.strategy_params(),
               **(c.model.attention.hsr_report() or {})}  # fmt: skip
        rows.append(row)
        if c.lead:
            append_row(out_path, row)
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
