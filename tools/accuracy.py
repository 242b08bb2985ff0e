"""RULER-13 accuracy against context length, strategy and star block size, on the real small models (CPU):
ACCURACY.md.

    python tools/accuracy.py run [--model gemma3_270m] [--length 4096] [--strategy global]   # resumable
    python tools/accuracy.py status                                                           # what is done
    python tools/accuracy.py report                                                           # tables + plot

`run` measures every cell of the plan below that is not complete, in the plan's order, through
`runner.py task=ruler` (RULER's 13 tasks from NVIDIA's generator, `pip install -e ".[ruler]"`). Each sample's row
is appended to accuracy/results/MODEL/LENGTH-STRATEGY.jsonl as it finishes, so a killed run loses at most the sample
in flight and the next `run` goes on from there. `report` rewrites ACCURACY.md's tables and accuracy/accuracy.png
from those files.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from longctx.attention.quant import ONE_BYTE
from longctx.evaluation.ruler import TASKS, means
from longctx.tasks.rows import read_rows

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "accuracy" / "results"
PLOT = REPO / "accuracy" / "accuracy.png"
DOC = REPO / "ACCURACY.md"
SAMPLES = 4  # per task and cell: 52 a cell, one sample is 1.9 points of a cell's mean
# what each model can show: its layers that attend through a sliding window (star changes only the others)
WINDOWED = {"gemma3_270m": (15, 18, 512), "smollm2": (0, 30, None)}


@dataclass(frozen=True)
class Strategy:
    name: str  # as the tables show it
    overrides: tuple[str, ...]  # runner.py options; {L} is the cell's length
    ranks: int = 1

    def args(self, length: int) -> list[str]:
        return [o.replace("{L4}", str(length // 4)).replace("{L8}", str(length // 8)) for o in self.overrides] + [
            f"parallel.nproc={self.ranks}"
        ]


STRATEGIES = {
    "global": Strategy("global", ("attention=global",)),
    "ring": Strategy("ring, 2 ranks", ("attention=ring",), ranks=2),
    "star4": Strategy("star, block L/4", ("attention=star", "attention.params.block_size={L4}")),
    "star4-recompute": Strategy(
        "star, block L/4, recompute, 2 ranks",
        ("attention=star", "attention.params.block_size={L4}", "attention.params.anchor_mode=recompute"),
        ranks=2,
    ),
    "star8": Strategy("star, block L/8", ("attention=star", "attention.params.block_size={L8}")),
    # The runner's default blocks (attention.star.star_block_size): a quarter of the context, at least 4096 tokens.
    "star-default": Strategy("star, default blocks", ("attention=star",)),
    "star8-recompute": Strategy(
        "star, block L/8, recompute, 2 ranks",
        ("attention=star", "attention.params.block_size={L8}", "attention.params.anchor_mode=recompute"),
        ranks=2,
    ),
    # HSR sparse decode (attention/hsr.py) at its defaults: phase 1 dense, every decode step certified to eps 1e-3
    "hsr": Strategy("global, decode=hsr", ("attention=global", "decode=hsr")),
    # the KV cache in one byte, FP8 or int8 (attention/quant.py), set beside the same strategy at full width
    "global-fp8": Strategy("global, kv.dtype=fp8", ("attention=global", "kv.dtype=fp8")),
    "star-default-fp8": Strategy("star, default blocks, kv.dtype=fp8", ("attention=star", "kv.dtype=fp8")),
    "global-int8": Strategy("global, kv.dtype=int8", ("attention=global", "kv.dtype=int8")),
    "star-default-int8": Strategy("star, default blocks, kv.dtype=int8", ("attention=star", "kv.dtype=int8")),
}
# each one-byte strategy's full-width counterpart and KV dtype: the share of answers that are token for token the same
FULL_WIDTH = {f"{full}-{kv}": (full, kv) for full in ("global", "star-default") for kv in ONE_BYTE}
ALL = ("global", "ring", "star4", "star4-recompute", "star8", "star8-recompute")


@dataclass(frozen=True)
class Cell:
    model: str
    length: int  # RULER's: prompt and answer tokens
    strategy: str
    samples_per_task: int = SAMPLES

    @property
    def path(self) -> Path:
        return RESULTS / self.model / f"{self.length}-{self.strategy}.jsonl"

    @property
    def samples(self) -> int:
        return len(TASKS) * self.samples_per_task

    def done(self) -> int:
        return len(_rows(self))


def plan() -> list[Cell]:
    """Every cell, in the order `run` measures them: SmolLM2 (full attention in every layer) before Gemma 3, each by
    length, so that every strategy has a cheap cell early; at a length, star's block sizes before its defaults
    (which are global's one block below 8K on SmolLM2), one-byte KV caches beside their full-width strategies; the
    recomputed anchor, which the 2K and 4K cells already set beside broadcast, at 8K last."""
    g, s = "gemma3_270m", "smollm2"
    recompute = ["star4-recompute", "star8-recompute"]
    cells = [Cell(s, 2048, st) for st in ("global", "star4", "star8", "ring", "global-fp8", *recompute)]
    cells += [Cell(s, 4096, st) for st in ("global", "star4", "star8", "global-fp8", *recompute)]
    cells += [Cell(s, n, "global-int8") for n in (2048, 4096)]
    one_byte = ("global-fp8", "star-default-fp8", "global-int8", "star-default-int8")
    cells += [Cell(s, 8192, st) for st in ("global", "star4", "star8", "star-default", *one_byte)]
    each = ("global", "star-default", "star4", "star8", *one_byte)
    cells += [Cell(g, 4096, st) for st in (*each, "ring")]
    cells += [Cell(g, n, st) for n in (8192, 16384) for st in each]
    cells += [Cell(g, 32768, st, 2) for st in each]
    return cells + [Cell(s, 8192, st) for st in recompute]


def run_cell(cell: Cell) -> int:
    cell.path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "runner.py",
        "task=ruler",
        f"model={cell.model}",
        f"task.lengths=[{cell.length}]",
        f"task.samples={cell.samples_per_task}",
        f"task.output_jsonl={cell.path}",
        "task.resume=true",
        "wandb.mode=disabled",
        f"hydra.run.dir={REPO / 'outputs' / 'accuracy' / cell.model / f'{cell.length}-{cell.strategy}'}",
        *STRATEGIES[cell.strategy].args(cell.length),
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {cell.model} {cell.length} {cell.strategy}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode


def status(cells: list[Cell]) -> str:
    """Each cell's progress, its seconds a sample (the median: samples timed while other work shared the CPU do not
    set the pace), and the time its remaining samples will take at that pace; a cell not begun is paced by the
    samples of the cells begun at its model and length (marked `est.`), or not at all where none is."""
    rows_of = {c: _rows(c) for c in cells}
    by_length: dict[tuple[str, int], list[float]] = {}
    for c, rows in rows_of.items():
        by_length.setdefault((c.model, c.length), []).extend(_seconds(r) for r in rows)
    lines, left, guessed, untimed = [], 0.0, 0.0, 0
    for c, rows in rows_of.items():
        near = by_length[(c.model, c.length)]
        secs = statistics.median(map(_seconds, rows)) if rows else (statistics.median(near) if near else math.nan)
        rest = (c.samples - len(rows)) * secs
        if math.isnan(rest):
            untimed += 1
        else:
            left += rest
            guessed += 0 if rows else rest
        lines.append(
            f"{c.model:12} {c.length:>6} {c.strategy:16} {len(rows):>3}/{c.samples}  {secs:7.1f} s/sample  "
            f"{rest / 3600:5.1f} h to go{'' if rows or not near else ' (est.)'}"
        )
    total = (
        f"{left / 3600:.1f} h to go ({guessed / 3600:.1f} h of it in cells not begun, paced by their length's others)"
    )
    return "\n".join(lines + [total + (f"; not timed yet at their length: {untimed} cells" if untimed else "")])


def _seconds(row: dict) -> float:
    return row.get("seconds", row["ttft_s"])


def _rows(cell: Cell) -> list[dict]:
    """A cell's samples, each once (the first row of a key: two runs of one cell append the same samples)."""
    rows = {}
    for row in read_rows(cell.path):
        rows.setdefault(row["key"], row)
    return list(rows.values())


# --- the report


def _label(n: int) -> str:
    return f"{n // 1024}K"


def _score(rows: list[dict]) -> float:
    """RULER's headline (%) over a cell's rows, all of one length: the mean over tasks of each task's mean."""
    (per_length,) = means(rows).values()
    return 100 * per_length["mean"]


def _of_global(rows: list[dict], base: list[dict]) -> float | None:
    """Score as a percentage of global's on the same samples (matched by key, so a partial cell compares fairly)."""
    keys = {r["key"] for r in base} & {r["key"] for r in rows}
    if not keys:
        return None
    ref = _score([r for r in base if r["key"] in keys])
    return 100 * _score([r for r in rows if r["key"] in keys]) / ref if ref > 0 else None


def _blocks(rows: list[dict]) -> tuple[int, int, int] | None:
    """Star's block size and the fewest and most blocks a sample's context was cut into (None: not star)."""
    sizes = [r["strategy"].get("block_size") for r in rows if r["strategy"].get("name") == "star"]
    if not sizes or sizes[0] is None:
        return None
    counts = [math.ceil(r["context_tokens"] / r["strategy"]["block_size"]) for r in rows]
    return sizes[0], min(counts), max(counts)


def model_table(model: str, cells: list[Cell]) -> list[str]:
    """RULER-13 mean per (length, strategy), star as a percentage of global, then per task."""
    mine = [c for c in cells if c.model == model and c.done()]
    lengths = sorted({c.length for c in mine})
    strategies = [s for s in STRATEGIES if any(c.strategy == s for c in mine)]
    by = {(c.length, c.strategy): _rows(c) for c in mine}
    head = "| strategy | " + " | ".join(_label(n) for n in lengths) + " |"
    out = [head, "|" + "---|" * (len(lengths) + 1)]
    for s in strategies:
        cells_txt = []
        for n in lengths:
            rows = by.get((n, s))
            if not rows:
                cells_txt.append("–")
                continue
            total = next(c.samples for c in mine if (c.length, c.strategy) == (n, s))
            text = f"{_score(rows):.1f}"
            if s != "global" and (ratio := _of_global(rows, by.get((n, "global")) or [])) is not None:
                text += f" ({ratio:.0f}%)"
            if len(rows) < total:
                text += f" [{len(rows)}/{total}]"
            cells_txt.append(text)
        out.append(f"| {STRATEGIES[s].name} | " + " | ".join(cells_txt) + " |")
    out += ["", "Per task (score %):", ""]
    out.append("| strategy | length | " + " | ".join(TASKS) + " | prompt tokens (mean) | s to first token (mean) |")
    out.append("|" + "---|" * (len(TASKS) + 4))
    for s in strategies:
        for n in lengths:
            rows = by.get((n, s))
            if not rows:
                continue
            per = [[r for r in rows if r["task"] == t] for t in TASKS]
            out.append(
                f"| {STRATEGIES[s].name} | {_label(n)} | "
                + " | ".join(f"{100 * sum(r['score'] for r in p) / len(p):.0f}" if p else "–" for p in per)
                + f" | {sum(r['prompt_tokens'] for r in rows) / len(rows):.0f} | {sum(r['ttft_s'] for r in rows) / len(rows):.1f} |"
            )
    return out


def shows_table(cells: list[Cell]) -> list[str]:
    """What each star cell can show: its blocks, whether it is exact by construction (one block is global's; with
    two, the second sees the anchor, which is the first, and itself), and whether it is evidence for models with
    full attention in every layer."""
    lines = [
        "| model | layers through a sliding window | length | strategy | block | blocks per prompt | what it shows |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        rows = _rows(c) if c.done() else []
        b = _blocks(rows)
        if b is None:
            continue
        size, few, many = b
        win, layers, span = WINDOWED[c.model]
        windowed = f"{win} of {layers} ({span} tokens)" if win else f"none of {layers}"
        if many <= 2:
            shows = "nothing: exact by construction"
        elif win:
            shows = f"star in {layers - win} full-attention layers only"
        else:
            shows = "star in every layer: evidence for full-attention models"
        count = f"{few}" if few == many else f"{few}–{many}"
        lines.append(
            f"| {c.model} | {windowed} | {_label(c.length)} | {STRATEGIES[c.strategy].name} | {size} | {count} | {shows} |"
        )
    return lines + [""] if len(lines) > 2 else []


def plot(cells: list[Cell], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c.model for c in cells if c.done()})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    colors = dict(zip(STRATEGIES, plt.get_cmap("tab20").colors))  # (a color for each of up to 20 strategies)
    for ax, model in zip(axes[0], models):
        for s in STRATEGIES:  # complete cells only: a partial one's mean covers some tasks only
            pts = sorted(
                (c.length, _score(_rows(c)))
                for c in cells
                if c.model == model and c.strategy == s and c.done() == c.samples
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=STRATEGIES[s].name,
                    color=colors[s],
                    linestyle="--" if "recompute" in s else ":" if s in FULL_WIDTH else "-",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c.length for c in cells if c.model == model}))
        ax.set_xticklabels([_label(n) for n in sorted({c.length for c in cells if c.model == model})])
        ax.set_ylim(0, 100)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("RULER-13 mean score (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BEGIN, END = "<!-- accuracy tables: tools/accuracy.py report -->", "<!-- end of accuracy tables -->"


def report(cells: list[Cell]) -> str:
    import torch

    lines = [BEGIN, ""]
    for model in sorted({c.model for c in cells if c.done()}, reverse=True):
        lines += [f"### {model}", ""] + model_table(model, cells) + [""]
    sparse = [c for c in cells if c.strategy == "hsr" and c.done()]
    if sparse:
        lines += [
            "Sparse decode (`decode=hsr`, eps 1e-3): what its steps read, per cell (from each sample's run):",
            "",
            "| model | length | samples | score vs global | blocks read (mean of samples) | largest certificate |",
            "|---|---|---|---|---|---|",
        ]
        for c in sparse:
            rows = _rows(c)
            base = next(
                (_rows(g) for g in cells if (g.model, g.length, g.strategy) == (c.model, c.length, "global")), []
            )
            ratio = _of_global(rows, base)
            share = sum(r.get("hsr_blocks_read_share", float("nan")) for r in rows) / len(rows)
            worst = max(r.get("hsr_max_certificate", float("nan")) for r in rows)
            lines.append(
                f"| {c.model} | {_label(c.length)} | {len(rows)}/{c.samples} | "
                f"{'–' if ratio is None else f'{ratio:.0f}%'} | {share:.1%} | {worst:.1e} |"
            )
        lines.append("")
    lines += ["What each star cell can show:", ""] + shows_table(cells)
    lines += one_byte_table(cells)
    pending = [c for c in cells if c.done() < c.samples]
    if pending:
        left = status(cells).splitlines()[-1]  # (done cells pace the others at their length)
        lines += ["Not measured yet (`python tools/accuracy.py run` goes on with them, in this order): "
                  + ", ".join(f"{c.model} {_label(c.length)} {c.strategy} ({c.done()}/{c.samples})" for c in pending)
                  + f". At the pace measured so far on {os.cpu_count()} CPU cores (`python tools/accuracy.py status`): "
                  + f"{left}.", ""]  # fmt: skip
    lines += [
        f"Made by `python tools/accuracy.py run` then `python tools/accuracy.py report` on {time.strftime('%Y-%m-%d')}, "
        f"CPU, fp32, torch {torch.__version__}. A cell shows RULER's mean over the tasks of each task's mean score, star's "
        "as a percentage of global's on the same samples in brackets; `[n/N]` marks a cell still being measured (its "
        "mean covers the samples done so far).",
        "",
        f"![score against length]({PLOT.relative_to(REPO)})",
        "",
        END,
    ]
    return "\n".join(lines)


def _paired_error(diffs: list[float]) -> float:
    """The standard error of the sum of paired differences: sqrt(n) times their sample standard deviation."""
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    return (n * sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5


def one_byte_table(cells: list[Cell]) -> list[str]:
    """Each one-byte KV cell next to the same strategy at full width: both scores on the samples both answered, the
    gap in samples (a sample of one task moves the score by 100 / samples), how many samples scored differently, the
    gap's standard error (paired: that of the sum of the samples' score differences, so a gap within about two of them
    is what chance alone moves), and the share of answers that are token for token the same."""
    one_byte = [c for c in cells if c.strategy in FULL_WIDTH and c.done()]
    if not one_byte:
        return []
    lines = [
        "The KV cache in one byte (`kv.dtype=fp8`: e4m3; `kv.dtype=int8`) against the same strategy at full width "
        "(fp32), on the same samples:",
        "",
        "| model | length | strategy | KV | samples | full width | one byte | gap (samples) | scored differently "
        "| gap's standard error (samples) | same answer, token for token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in one_byte:
        full, kv = FULL_WIDTH[c.strategy]
        base = {
            r["key"]: r for g in cells if (g.model, g.length, g.strategy) == (c.model, c.length, full) for r in _rows(g)
        }
        rows = [r for r in _rows(c) if r["key"] in base]
        if not rows:
            continue
        same = sum(r["pred"] == base[r["key"]]["pred"] for r in rows)
        wide = _score([base[r["key"]] for r in rows])
        score = _score(rows)
        diffs = [base[r["key"]]["score"] - r["score"] for r in rows]
        lines.append(
            f"| {c.model} | {_label(c.length)} | {STRATEGIES[full].name} | {kv} | {len(rows)}/{c.samples} | "
            f"{wide:.1f} | {score:.1f} | {(wide - score) * len(rows) / 100:.1f} | {sum(d != 0 for d in diffs)} | "
            f"{_paired_error(diffs):.1f} | {same / len(rows):.0%} |"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "status", "report"))
    parser.add_argument("--model", action="append", help="only cells of this model (repeatable)")
    parser.add_argument("--length", type=int, action="append", help="only cells of this nominal length (repeatable)")
    parser.add_argument(
        "--strategy", action="append", choices=sorted(STRATEGIES), help="only this strategy (repeatable)"
    )
    args = parser.parse_args(argv)
    cells = [
        c
        for c in plan()
        if (not args.model or c.model in args.model)
        and (not args.length or c.length in args.length)
        and (not args.strategy or c.strategy in args.strategy)
    ]
    if args.command == "status":
        print(status(cells))
    elif args.command == "run":
        for cell in cells:
            if cell.done() < cell.samples and run_cell(cell):
                print(f"cell {cell.model} {cell.length} {cell.strategy} failed; going on with the next", flush=True)
        print(status(cells))
    else:
        plot(plan(), PLOT)
        text = DOC.read_text() if DOC.is_file() else f"# Accuracy\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text:
            raise SystemExit(f"{DOC} has no {BEGIN!r} marker to put the tables under")
        head, rest = text.split(BEGIN, 1)
        DOC.write_text(head + report(plan()) + rest.split(END, 1)[1])
        print(f"wrote {DOC} and {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
