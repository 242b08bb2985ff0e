"""runner.py end to end, as a user runs it: subprocesses on CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from longctx.tasks.rows import read_rows
from tests.helpers import REPO, run_runner


def test_default_run_finds_the_hidden_fact_and_logs_offline(smollm2_dir, tmp_path):
    res = run_runner(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "found in the answer" in res.stderr and "NOT found" not in res.stderr
    assert "· star ·" in res.stderr and "time to first token" in res.stderr and "KV cache per rank" in res.stderr
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["demo_fact_found"] is True and result["prompt_tokens"] > 1900
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    runs = list((tmp_path / "wandb-root" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run's record stream, for `wandb sync`
    assert b"ttft_s" in log and b"decode_tok_s" in log and b"smollm2" in log  # metrics and the resolved config


def _answer(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def test_two_ranks_ring_and_star_answer_like_global(smollm2_dir, tmp_path):
    common = (
        "task.prompt=What is the capital of France? Answer in one sentence.",
        "task.max_new_tokens=16",
        "wandb.mode=disabled",
    )
    ref = run_runner(tmp_path, "attention=global", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "Paris" in ref.stdout
    for strategy in ("ring", "star"):
        res = run_runner(tmp_path, "parallel.nproc=2", f"attention={strategy}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "2 ranks" in res.stderr
        assert _answer(res.stdout) == _answer(ref.stdout)


def test_tensor_parallel_on_one_host_answers_like_one_rank(smollm2_dir, tmp_path):
    # SmolLM2's 9 query heads and 3 KV heads split over tp=3
    common = (
        "task.prompt=What is the capital of France? Answer in one sentence.",
        "task.max_new_tokens=16",
        "wandb.mode=disabled",
    )
    ref = run_runner(tmp_path, "attention=global", *common)
    res = run_runner(tmp_path, "attention=global", "parallel.nproc=3", "parallel.tp=3", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 host × tp=3" in res.stderr and "Paris" in res.stdout
    assert _answer(res.stdout) == _answer(ref.stdout)


def test_hosts_of_tensor_parallel_ranks_bench_from_the_command_line(tmp_path):
    # the layout of `model=llama3_70b attention=star ctx=128k parallel.nproc=8 parallel.tp=4`, at tiny scale
    results = tmp_path / "bench.jsonl"
    res = run_runner(
        tmp_path,
        "task=bench",
        "model=tiny",
        "attention=star",
        "ctx=2k",
        "parallel.nproc=4",
        "parallel.tp=2",
        "attention.params.anchor_mode=recompute",
        f"task.results_file={results}",
        "wandb.mode=disabled",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "over 2 hosts × tp=2" in res.stderr and "peak host memory per rank" in res.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert (record["ranks"], record["hosts"], record["tp"]) == (4, 2, 2)
    assert len(record["peak_host_bytes_per_rank"]) == 4 and record["decode_tok_s"] > 0


def test_generate_from_jsonl(smollm2_dir, tmp_path):
    records = [
        {
            "input_context": "Alice lives in Paris. Bob lives in Rome. ",
            "input_query": "Where does Bob live?",
            "output": "Rome",
        },
        {"input_context": "The box is red. ", "input_query": "What color is the box?", "output": "red"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = run_runner(
        tmp_path, f"task.input_jsonl={src}", "attention=global", "task.max_new_tokens=12", "wandb.mode=disabled"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(tmp_path / "run" / "answers.jsonl")
    assert [r["output"] for r in rows] == ["Rome", "red"]
    assert "Rome" in rows[0]["pred"]


def test_ruler_writes_table_results_and_heatmap_and_resumes(smollm2_dir, tmp_path):
    """RULER's own samples (made once: tests/test_ruler.py makes the same ones), in the chat template with the
    answer prefix after it, scored per task, the mean over the tasks as the headline. Rows are written as samples
    finish; with task.resume=true the samples already written are not run again."""
    out = tmp_path / "samples.jsonl"
    common = (
        "task=ruler",
        "task.lengths=[2048]",
        "task.tasks=[niah_single_2,qa_1]",
        "task.max_new_tokens=16",
        "wandb.mode=disabled",
        f"task.output_jsonl={out}",
    )
    res = run_runner(tmp_path, *common)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    table = (run / "ruler_table.txt").read_text()
    assert "niah_single_2" in table and "qa_1" in table and "mean" in table and "2048" in table
    result = json.loads((run / "results.json").read_text())
    rows = read_rows(out)
    assert [r["key"] for r in rows] == [f"{t}/2048/{i}" for t in ("niah_single_2", "qa_1") for i in (0, 1)]
    means = {t: sum(r["score"] for r in rows if r["task"] == t) / 2 for t in ("niah_single_2", "qa_1")}
    assert result["ruler/mean"] == pytest.approx(sum(means.values()) / 2)
    assert result["ruler/niah_single_2"] == pytest.approx(means["niah_single_2"])
    assert (run / "ruler_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "wandb-root" / "wandb").exists()  # disabled: no W&B directory
    for r in rows:  # within the length, the context before the question
        assert r["prompt_tokens"] + 16 <= 2048 and 0 < r["context_tokens"] < r["prompt_tokens"]
    assert rows[0]["strategy"]["name"] == "star" and rows[0]["strategy"]["block_size"] > 0
    assert re.search(r"star: context of \d+ tokens in 1 block of \d+ over 1 rank, anchor", res.stderr)  # the floor

    lines = out.read_text().splitlines()
    assert len(lines) == 5  # the header, then a row a sample
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # killed while writing the last row: a torn line
    res = run_runner(tmp_path, *common, "task.resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: 3 of 4 samples" in res.stderr and "cut off a torn last line (20 bytes)" in res.stderr
    again = out.read_text().splitlines()
    assert again[:4] == lines[:4] and len(again) == 5 and json.loads(again[4])["key"] == json.loads(lines[4])["key"]
    result = json.loads((run / "results.json").read_text())
    assert result["ruler/mean"] == pytest.approx(ruler_mean(read_rows(out)))
    res = run_runner(tmp_path, *common)  # without resume, rows already there are not mixed with new ones
    assert res.returncode != 0 and "already holds results" in res.stderr and out.read_text().splitlines() == again


def ruler_mean(rows: list[dict]) -> float:
    tasks = {r["task"] for r in rows}
    return sum(
        sum(r["score"] for r in rows if r["task"] == t) / sum(r["task"] == t for r in rows) for t in tasks
    ) / len(tasks)


def test_bench_appends_a_record_and_multirun_compares(tmp_path):
    results = tmp_path / "bench.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            "runner.py",
            "-m",
            "task=bench",
            "model=tiny",
            "ctx=2k",
            "attention=global,star",
            f"task.results_file={results}",
            "wandb.mode=disabled",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["attention"] for r in records] == ["global", "star"]
    assert all(r["random_weights"] and r["ctx"] == 2048 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0 for r in records)
    assert "random weights" in res.stderr
    table = (tmp_path / "sweep" / "comparison.txt").read_text()
    assert "attention=global" in table and "attention=star" in table and "ttft_s" in table


def test_a_killed_rank_ends_the_run(smollm2_dir, tmp_path):
    env = {**os.environ, "WANDB_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "runner.py",
            "parallel.nproc=2",
            "attention=ring",
            "ctx=4k",
            "parallel.timeout_s=60",
            "task.max_new_tokens=400",
            "wandb.mode=disabled",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())]
        assert len(workers) >= 2, "the two workers did not start"
        time.sleep(8)  # let them load the model and start working
        os.kill(workers[-1].pid, signal.SIGKILL)
        start = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.time() - start < 90
    assert "failed" in err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=gpt5"], "gpt5"),
        (["ctx=16k"], "past the 8192 positions smollm2 was trained for"),
        (["parallel.nproc=0"], "parallel.nproc must be a whole number >= 1"),
        (["model=llama3"], "names no checkpoint"),
        (["task=bench", "task.new_tokens=3"], "use task.new_tokens >= 4"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, message, tmp_path):
    res = run_runner(tmp_path, *overrides, "wandb.mode=disabled", timeout=120)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]


def test_prompt_from_stdin(smollm2_dir, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "runner.py",
            "task.prompt_file=-",
            "attention=global",
            "task.max_new_tokens=12",
            "wandb.mode=disabled",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        input="What is the capital of France?",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Paris" in res.stdout


# runner.py under torchrun, two processes on this machine
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "runner.py"]


def test_joins_a_torchrun_group(smollm2_dir, tmp_path):
    res = subprocess.run(
        [
            *TORCHRUN_2,
            "attention=star",
            "task.prompt=What is the capital of France?",
            "task.max_new_tokens=12",
            "wandb.mode=disabled",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 ranks" in res.stderr and "Paris" in res.stdout
    assert json.loads((tmp_path / "results.json").read_text())["answer"].count("Paris") >= 1


def test_joins_a_torchrun_group_as_one_host_of_tensor_parallel_ranks(tmp_path):
    results = tmp_path / "bench.jsonl"
    res = subprocess.run(
        [
            *TORCHRUN_2,
            "task=bench",
            "model=tiny",
            "attention=global",
            "ctx=2k",
            "parallel.tp=2",
            f"task.results_file={results}",
            "wandb.mode=disabled",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(results.read_text())
    assert (record["ranks"], record["hosts"], record["tp"]) == (2, 1, 2)


def test_star_default_blocks():
    from longctx.attention.star import star_block_size

    assert star_block_size(3000, 1, 4096) == 3000  # below the floor: one exact block
    assert star_block_size(10_000, 1, 4096) == 4096  # 3 blocks of 4096, not 4 of 2500
    assert star_block_size(100_000, 1, 4096) == 25_000  # long contexts: a quarter
    assert star_block_size(100_000, 8, 4096) == 12_500  # beyond 4 ranks: one block per rank
    assert star_block_size(3000, 2, 4096) == 1500  # every rank still gets a block
    assert star_block_size(5, 8, 4096) == 1
    assert star_block_size(10_000, 1, 0) == 2500  # no floor: the quarter
