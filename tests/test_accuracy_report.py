"""tools/accuracy.py's report: RULER's headline (the mean over tasks), star as a share of global on the same
samples, and what each star cell can show (its blocks; one or two are exact by construction)."""

from __future__ import annotations

import json

from longctx.tasks.rows import HEADER
from longctx.tools import accuracy


def _row(task: str, i: int, score: float, block: int | None = None, context: int = 1000) -> dict:
    strategy = {"name": "star", "block_size": block} if block else {"name": "global"}
    return {"key": f"{task}/4096/{i}", "task": task, "length": 4096, "score": score, "context_tokens": context,
            "strategy": strategy}  # fmt: skip


def test_the_headline_is_the_mean_over_tasks_and_star_is_compared_on_the_same_samples():
    rows = [_row("vt", 0, 1.0), _row("vt", 1, 0.0), _row("cwe", 0, 1.0)]
    assert accuracy._score(rows) == 75.0  # vt 50, cwe 100: not 2 of 3 samples
    base = [_row("vt", 0, 1.0), _row("vt", 1, 1.0), _row("cwe", 0, 1.0), _row("cwe", 1, 0.0)]
    star = [_row("vt", 0, 1.0, 1024), _row("vt", 1, 0.0, 1024)]  # a partial cell: vt only
    assert accuracy._of_global(star, base) == 50.0  # against global's vt, not global's mean of both tasks


def test_star_cells_say_how_many_blocks_they_cut_and_which_are_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    cells = [accuracy.Cell("smollm2", 4096, "star4", 1), accuracy.Cell("smollm2", 8192, "star-default", 1)]
    for cell, block, context in ((cells[0], 1024, 3900), (cells[1], 4096, 7900)):
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [_row(t, 0, 1.0, block, context) for t in accuracy.TASKS]
        cell.path.write_text("\n".join(json.dumps(r) for r in [{HEADER: {}}, *rows]) + "\n")
    assert accuracy._blocks(accuracy._rows(cells[0])) == (1024, 4, 4)
    table = "\n".join(accuracy.shows_table(cells))
    assert "| smollm2 | none of 30 | 4K | star, block L/4 | 1024 | 4 | star in every layer" in table
    assert "| smollm2 | none of 30 | 8K | star, default blocks | 4096 | 2 | nothing: exact by construction |" in table


def test_the_report_plots_every_strategy_and_sets_one_byte_caches_beside_full_width(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    cells = [accuracy.Cell("smollm2", 4096, s, 1) for s in accuracy.STRATEGIES]
    for cell in cells:  # full width answers every task; int8 misses one, FP8 two
        misses = {"global-int8": 1, "global-fp8": 2}.get(cell.strategy, 0)
        rows = [{**_row(t, 0, float(i >= misses)), "pred": ["x" if i >= misses else "y"]}
                for i, t in enumerate(accuracy.TASKS)]  # fmt: skip
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        cell.path.write_text("\n".join(json.dumps(r) for r in [{HEADER: {}}, *rows]) + "\n")
    assert accuracy.plot(cells, tmp_path / "plot.png").stat().st_size > 0
    table = "\n".join(accuracy.one_byte_table(cells))
    n = len(accuracy.TASKS)
    for kv, misses in (("int8", 1), ("fp8", 2)):
        # differences: `misses` ones, the rest zeros; sqrt(n) times their sample standard deviation
        mean = misses / n
        error = (n * (misses * (1 - mean) ** 2 + (n - misses) * mean**2) / (n - 1)) ** 0.5
        assert (
            f"| smollm2 | 4K | global | {kv} | {n}/{n} | 100.0 | {100 * (n - misses) / n:.1f} | {misses:.1f} | "
            f"{misses} | {error:.1f} | {(n - misses) / n:.0%} |" in table
        )


def test_status_paces_a_cell_by_its_median_sample(tmp_path, monkeypatch):
    """One sample slowed by other work on the machine does not set the estimate of what is left."""
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    cell = accuracy.Cell("smollm2", 4096, "global", 1)
    cell.path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {**_row(t, 0, 1.0), "ttft_s": 30.0, "seconds": 40.0 if i else 900.0} for i, t in enumerate(accuracy.TASKS[:5])
    ]
    cell.path.write_text("\n".join(json.dumps(r) for r in [{HEADER: {}}, *rows]) + "\n")
    line = accuracy.status([cell]).splitlines()[0]
    left = (len(accuracy.TASKS) - 5) * 40.0 / 3600
    assert "5/13" in line and "40.0 s/sample" in line and f"{left:5.1f} h to go" in line


def test_status_paces_a_cell_not_begun_by_the_others_at_its_length(tmp_path, monkeypatch):
    """A cell not begun takes the pace of the samples measured at its model and length (an estimate, so marked);
    at a length where nothing is measured it has none, and the total says how many such cells there are."""
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    begun, waiting = accuracy.Cell("smollm2", 4096, "global", 1), accuracy.Cell("smollm2", 4096, "star4", 1)
    untimed = accuracy.Cell("smollm2", 8192, "global", 1)
    begun.path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**_row(t, 0, 1.0), "ttft_s": 30.0, "seconds": 60.0, "prompt_tokens": 1000} for t in accuracy.TASKS[:4]]
    begun.path.write_text("\n".join(json.dumps(r) for r in [{HEADER: {}}, *rows]) + "\n")
    lines = accuracy.status([begun, waiting, untimed]).splitlines()
    n = len(accuracy.TASKS)
    assert "60.0 s/sample" in lines[1] and f"{n * 60 / 3600:5.1f} h to go (est.)" in lines[1]
    assert "nan s/sample" in lines[2] and "est." not in lines[2]
    assert f"{(2 * n - 4) * 60 / 3600:.1f} h to go ({n * 60 / 3600:.1f} h of it in cells not begun" in lines[3]
    assert lines[3].endswith("; not timed yet at their length: 1 cells")
    assert f"CPU cores (`python tools/accuracy.py status`): {lines[3]}." in accuracy.report([begun, waiting, untimed])
