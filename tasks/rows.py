"""Results files of one JSON row per sample, appended as each is made (a killed run loses only the row in flight)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
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


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
