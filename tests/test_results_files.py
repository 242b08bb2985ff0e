"""Results files that cannot lie (tasks/rows.py): each says what it answers, resume refuses another input or other
options, a torn last line is cut off before appending, one writer at a time, a full disk is named."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from longctx import runner
from longctx.conf.schema import OptionError
from longctx.tasks import rows
from longctx.tasks.context import Context
from longctx.tasks.generate import answers_made
from tests.helpers import compose_cfg

RECORD = {"input_context": "Alice lives in Paris.", "input_query": "Where?", "output": "Paris"}


def _inputs(tmp_path: Path, text: str = json.dumps(RECORD)) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(text + "\n")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    inputs = tmp_path / "in.jsonl"
    return compose_cfg(f"task.input_jsonl={inputs if inputs.is_file() else _inputs(tmp_path)}", *overrides)


def test_a_file_says_what_it_answers_and_keeps_whole_lines(tmp_path):
    made = answers_made(_cfg(tmp_path))
    path = tmp_path / "answers.jsonl"
    with rows.Writer(path, "task.output_jsonl", made) as w:
        w.append({"index": 0, "pred": "Paris"})
        w.append({"index": 1, "pred": "Rome"})
    assert json.loads(path.read_text().splitlines()[0]) == {rows.HEADER: made}
    with open(path, "ab") as f:  # killed while writing a row
        f.write(b'{"index": 2, "pr')
    held = rows.read(path)
    assert held.made == made and [r["index"] for r in held.rows] == [0, 1] and held.torn == 16
    with rows.Writer(path, "task.output_jsonl", made) as w:
        assert w.cut == 16
        w.append({"index": 2, "pred": "Oslo"})
    assert [r["index"] for r in rows.read_rows(path)] == [0, 1, 2] and path.read_text().endswith('"Oslo"}\n')


def test_resume_refuses_answers_to_another_input_or_other_options(tmp_path):
    path = tmp_path / "answers.jsonl"
    with rows.Writer(path, "task.output_jsonl", answers_made(_cfg(tmp_path))) as w:
        w.append({"index": 0, "pred": "Paris"})
    assert rows.check_resumable(path, "task.output_jsonl", answers_made(_cfg(tmp_path))).rows  # the same: fine
    other = answers_made(_cfg(tmp_path, "task.max_new_tokens=9", "attention=global"))
    with pytest.raises(
        OptionError, match=r"answers other inputs or options: .*attention=.*task.max_new_tokens=48 there, 9 now"
    ):
        rows.check_resumable(path, "task.output_jsonl", other)
    _inputs(tmp_path, json.dumps(RECORD | {"input_query": "Who?"}))  # the input file changed
    with pytest.raises(OptionError, match="task.input_jsonl has other content"):
        rows.check_resumable(path, "task.output_jsonl", answers_made(_cfg(tmp_path)))
    foreign = tmp_path / "other.jsonl"
    foreign.write_text('{"id": 3, "text": "not ours"}\n')
    with pytest.raises(OptionError, match="does not say what its rows answer"):
        rows.check_resumable(foreign, "task.output_jsonl", answers_made(_cfg(tmp_path)))


def test_the_runner_refuses_foreign_answers_before_anything_starts(tmp_path):
    path = tmp_path / "answers.jsonl"
    with rows.Writer(path, "task.output_jsonl", answers_made(_cfg(tmp_path, "attention=global"))) as w:
        w.append({"index": 0, "pred": "Paris"})
    cfg = _cfg(tmp_path, f"task.output_jsonl={path}", "task.resume=true")  # star, not global
    with pytest.raises(OptionError, match="answers other inputs or options: attention="):
        runner.validate(cfg)
    runner.validate(_cfg(tmp_path, f"task.output_jsonl={path}", "task.resume=true", "attention=global"))


def test_one_writer_at_a_time(tmp_path):
    path, made = tmp_path / "answers.jsonl", answers_made(_cfg(tmp_path))
    with rows.Writer(path, "task.output_jsonl", made):
        assert rows.locked(path)
        with pytest.raises(OptionError, match="is being written by another run"):
            with rows.Writer(path, "task.output_jsonl", made):
                pass
    assert not rows.locked(path)


def test_a_full_disk_names_the_file_and_the_option(tmp_path, monkeypatch):
    path = tmp_path / "answers.jsonl"
    with rows.Writer(path, "task.output_jsonl", answers_made(_cfg(tmp_path))) as w:
        monkeypatch.setattr(
            os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        )
        with pytest.raises(
            OSError, match=rf"task.output_jsonl={path}: the disk is full while appending a row .*task.resume=true"
        ):
            w.append({"index": 0})


def test_resume_without_a_file_goes_on_from_the_newest_earlier_run_of_the_same_input(tmp_path):
    cfg = _cfg(tmp_path, "task.resume=true")
    made = answers_made(cfg)
    outputs = tmp_path / "outputs"
    for run, same in (("2026-12-01/10-00-00", True), ("2026-12-02/10-00-00", True), ("2026-12-03/10-00-00", False)):
        path = outputs / run / "answers.jsonl"
        with rows.Writer(path, "task.output_jsonl", made if same else answers_made(_cfg(tmp_path, "seed=7"))):
            pass
        time.sleep(0.01)  # (later runs are newer)
    task = SimpleNamespace(cfg=cfg, run_dir=outputs / "2026-12-05" / "12-00-00")
    path, held = Context.results(task, "answers.jsonl", made)
    assert path == outputs / "2026-12-02/10-00-00/answers.jsonl" and held == []
    lonely = SimpleNamespace(cfg=OmegaConf.merge(cfg, {"seed": 3}), run_dir=task.run_dir)
    with pytest.raises(OptionError, match="task.resume=true without task.output_jsonl .* there is none"):
        Context.results(lonely, "answers.jsonl", answers_made(lonely.cfg))
