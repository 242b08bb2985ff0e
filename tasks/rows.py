"""Results files of one JSON row per sample, appended as each is made, that say what they answer.

The first line of a file is its header: a fingerprint of what its rows answer (the inputs' content and every option
that changes an answer) and those options, readable. A run that goes on from a file (`task.resume=true`) checks the
header first and refuses a file made from other inputs or options, naming what differs. One run writes a file at a
time (an exclusive lock, held while it runs). A torn last line (a kill or a full disk mid-write) is cut off before
the next row is appended, so that every line stays whole. A killed run loses only the row in flight.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from longctx.conf.schema import OptionError

HEADER = "longctx_results"


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# The run's options that change an answer, whatever the task (the tasks add their own).
ANSWER_OPTIONS = ("model.name", "model.path", "model.builtin", "model.config", "dtype", "kv.dtype", "seed", "attention",
                  "decode", "parallel.nproc", "parallel.tp")  # fmt: skip


def made_from(cfg: Any, task_options: tuple[str, ...], inputs: dict[str, Path]) -> dict:
    """What a results file's rows answer: the values of the options that change an answer (the run's and the
    task's own, `task_options`), and the SHA-256 of each input (option -> file or folder)."""
    from omegaconf import OmegaConf

    keys = (*ANSWER_OPTIONS, *(f"task.{k}" for k in task_options))
    values = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v for k in keys}
    return {"options": values, "inputs": {k: digest(p) for k, p in inputs.items()}}


def _fingerprint(made: dict) -> str:
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Contents:
    """What a results file holds: its header's record of what it answers (None: a file without one) and its rows,
    and how many bytes of a torn last line follow the last whole one."""

    made: dict | None = None
    rows: list[dict] = field(default_factory=list)
    torn: int = 0


def read(path: Path) -> Contents:
    """The header and rows of a results file (none where it does not exist)."""
    if not path.is_file():
        return Contents()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    out = Contents(torn=len(data) - len(whole))
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise OptionError(f"{path}:{number}: not a JSON row; is it a results file of this runner?") from None
        if number == 1 and isinstance(value, dict) and HEADER in value:
            out.made = value[HEADER]
        else:
            out.rows.append(value)
    return out


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file, its header left out."""
    return read(path).rows


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two records of what a file answers, one phrase each."""
    diffs = [
        f"{k}={old['options'].get(k)!r} there, {v!r} now"
        for k, v in new["options"].items()
        if old["options"].get(k) != v
    ]
    diffs += [f"{k} has other content" for k, v in new["inputs"].items() if old["inputs"].get(k) != v]
    return diffs


def check_resumable(path: Path, option: str, made: dict) -> Contents:
    """The contents of `path` if a run answering `made` may go on from them; else an OptionError naming what differs."""
    contents = read(path)
    if contents.rows and contents.made is None:
        raise OptionError(
            f"{option}={path} does not say what its rows answer (no header: another program's file, or one written "
            "before results files had one); name another file"
        )
    if contents.made is not None and contents.made != made:
        raise OptionError(
            f"{option}={path} answers other inputs or options: {'; '.join(differences(contents.made, made))}; "
            "name another file, or run with the same ones"
        )
    return contents


def locked(path: Path) -> bool:
    """Whether another process holds `path`'s writer lock now."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


class Writer:
    """The one writer of a results file while a run lasts: takes its lock, cuts a torn last line, writes the header
    of a new file, appends rows whole (flushed and synced each)."""

    def __init__(self, path: Path, option: str, made: dict):
        self.path, self.option, self.made = path, option, made
        self.file: IO[bytes] | None = None
        self.cut = 0  # bytes of a torn last line cut off on opening

    def __enter__(self) -> Writer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "ab+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise OptionError(
                f"{self.option}={self.path} is being written by another run; wait for it to end, or name another file"
            ) from None
        self.file.seek(0)
        data = self.file.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            self.cut = len(data) - whole
            self.file.truncate(whole)
        if whole == 0:
            self._write({HEADER: self.made})
        return self

    def append(self, row: dict) -> None:
        self._write(row)

    def _write(self, value: dict) -> None:
        try:
            self.file.seek(0, os.SEEK_END)
            self.file.write((json.dumps(value) + "\n").encode())
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise OSError(
                f"{self.option}={self.path}: {reason} while appending a row (the rows before it are kept); free the "
                "space and run again with task.resume=true"
            ) from None

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def latest(root: Path, name: str, made: dict, exclude: Path) -> Path | None:
    """The newest results file called `name` in the run directories under `root` (outputs/DATE/TIME/) that answers
    `made`, other than `exclude`."""
    found = [p for p in root.glob(f"*/*/{name}") if p != exclude and read(p).made == made]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
