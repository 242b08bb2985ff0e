"""tools/benchmarks.py and tools/bench/ off the GPU: their tables, and a clear refusal where there is no CUDA device."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from longctx.tools import benchmarks
from longctx.tools.bench.common import Table, publish
from longctx.tools.bench.model import plant_model_cache


def test_a_table_names_date_device_torch_and_command():
    table = Table("decode", "python tools/benchmarks.py decode", ["batch", "µs", "note"])
    table.rows.append([8, 1234.56, "x"])
    table.rows.append([1, 3.14159, float("nan")])
    table.notes.append("measured twice")
    text = table.markdown()
    assert text.startswith(f"## {time.strftime('%Y-%m-%d')} · decode · ")
    assert f"torch {torch.__version__}" in text.splitlines()[0]
    assert "```bash\npython tools/benchmarks.py decode\n```" in text
    assert "| batch | µs | note |\n|---|---|---|\n| 8 | 1,234.6 | x |\n| 1 | 3.14 | – |" in text
    assert text.rstrip().endswith("measured twice")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "BENCHMARKS.md"
    with pytest.raises(SystemExit) as exit_info:
        benchmarks.main(["decode", "--append", str(target)])
    assert exit_info.value.code == 2
    assert "need a CUDA GPU" in capsys.readouterr().err
    assert not target.exists()


def test_a_new_table_replaces_its_figure_and_nothing_else():
    doc = "# Benchmarks\n\nintro\n"
    doc = publish(doc, "## 2026-01-01 · decode v1\n\n| a |\n", "decode")
    doc = publish(doc, "## 2026-01-01 · prefill v1\n\n| b |\n", "prefill")
    doc = publish(doc, "## 2026-01-02 · decode v2\n\n| c |\n", "decode")
    doc = publish(doc, "## 2026-01-03 · decode v3\n\n| d |\n", "decode")
    assert doc.startswith("# Benchmarks\n\nintro\n")
    # one current table per figure, in the order the figures first appeared; the replaced ones are gone (git has them)
    assert (
        doc.count("<!-- figure: decode -->") == 1
        and "decode v3" in doc
        and "decode v1" not in doc
        and "decode v2" not in doc
    )
    assert doc.index("decode v3") < doc.index("prefill v1")
    again = publish(doc, "## x · prefill v2\n", "prefill")
    assert (
        "prefill v1" not in again and again.replace("## x · prefill v2", "## 2026-01-01 · prefill v1\n\n| b |") == doc
    )


def test_the_kv_runs_alone_at_the_longest_context_publish_one_table_per_gpu_model(monkeypatch):
    """`kv --lengths "" --longest-kv N`: the one long star FP8 run, its table named for the GPU model (an H100's and an
    H200's kept side by side), no empty chunked table; neither contexts nor a longest run is refused."""
    import json

    from longctx.tools.bench import common, kv

    args = benchmarks.argparse.Namespace(
        lengths="", attention=None, longest_kv=1 << 20, longest_block=None, warmup=1, quick=False, results=None
    )
    options = benchmarks.PARTS["kv"][1](args)
    assert options["contexts"] == [] and options["longest"] == 1 << 20 and options["longest_block"] == 64 * 1024
    ran = []

    def fake_bench(results, *opts):
        ran.append(opts)
        block = int(next(o for o in opts if o.startswith("attention.params.block_size=")).split("=")[1])
        record = dict(attention="star", ctx=1 << 20, kv_dtype="fp8", ttft_s=300.0, decode_tok_s=30.0, block_size=block,
                      chunk=8192, kv_bytes_per_rank=[64 << 30], planned_peak_bytes_per_rank=[100 << 30],
                      peak_mem_bytes_per_rank=[98 << 30])  # fmt: skip
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        return "python runner.py " + " ".join(opts)

    monkeypatch.setattr(kv, "_bench", fake_bench)
    monkeypatch.setattr(common, "device_name", lambda: "NVIDIA H200")
    tables = kv.bench_kv(common.Recorder(None), **options)
    assert ran == [("attention=star", "kv.dtype=fp8", "ctx.length=1048576", "attention.params.block_size=65536",
                    "task.warmup=0")]  # fmt: skip
    assert [t.figure for t in tables] == ["longest-run-h200"] and len(tables[0].rows) == 1
    row = dict(zip(tables[0].columns, tables[0].rows[0]))
    assert (row["star block"], row["phase-1 chunk"], row["KV cache (GiB)"]) == (65536, 8192, 64)
    assert row["planned / measured"] == pytest.approx(100 / 98)
    with pytest.raises(ValueError, match="--longest-kv"):
        kv.bench_kv(common.Recorder(None), [], ["star"], longest=None)


def test_the_kv_sweep_sets_each_one_byte_cache_beside_bf16(monkeypatch):
    """`kv --lengths N --longest-kv L`: bf16, FP8 and int8 in one sweep; each one-byte row's decode and TTFT as a ratio
    of bf16's at the same strategy and context; the long run in its own table, not among the sweep's rows."""
    import json

    from longctx.tools.bench import common, kv

    decode = {"auto": 80.0, "fp8": 90.0, "int8": 100.0}
    ran = []

    def fake_bench(results, *opts):
        ran.append(opts)
        given = dict(o.split("=", 1) for o in opts)
        dtypes = given.get("kv.dtype", "auto").split(",")
        with open(results, "a") as f:
            for d in dtypes:
                record = dict(attention="star", ctx=int(given["ctx.length"]), kv_dtype=d, ttft_s=8.0,
                              decode_tok_s=decode[d], planned_peak_bytes_per_rank=[30 << 30],
                              peak_mem_bytes_per_rank=[30 << 30], chunk=None, kv_bytes_per_rank=[8 << 30],
                              phase1_passes=2)  # fmt: skip
                if "attention.params.block_size" in given:
                    record["block_size"] = int(given["attention.params.block_size"])
                f.write(json.dumps(record) + "\n")
        return "python runner.py " + " ".join(opts)

    monkeypatch.setattr(kv, "_bench", fake_bench)
    monkeypatch.setattr(common, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    runs, _, longest = kv.bench_kv(common.Recorder(None), [1 << 17], ["star"], longest=1 << 18)
    assert "kv.dtype=auto,fp8,int8" in ran[0]
    assert {row[1] for row in runs.rows} == {1 << 17} and [row[1] for row in longest.rows] == [1 << 18]
    by_kv = {row[2]: row for row in runs.rows if row[3] == "default"}
    ratio = runs.columns.index("vs bf16 decode")
    assert by_kv["fp8"][ratio] == 90.0 / 80.0 and by_kv["int8"][ratio] == 100.0 / 80.0
    assert by_kv["bf16"][ratio] != by_kv["bf16"][ratio]  # (no ratio for bf16 itself: nan)


def test_a_kv_sweep_cut_short_goes_on_where_it_stopped(monkeypatch, tmp_path):
    """`kv --results FILE`: a process whose runs the file holds is not started again, the tables take the runs of
    both calls (the latest of a run measured twice), and runs of other options in the file stay out of them."""
    import json

    from longctx.tools.bench import common, kv

    ran = []

    def fake_bench(results, *opts):
        ran.append(opts)
        given = dict(o.split("=", 1) for o in opts)
        if given["ctx.length"] == "262144" and "ctx.chunk" not in given and len(ran) == 2:
            raise subprocess.CalledProcessError(124, "runner.py")  # the time limit, before this process wrote a run
        with open(results, "a") as f:
            for d in given.get("kv.dtype", "auto").split(","):
                for c in given.get("ctx.chunk", "").split(","):
                    record = dict(attention="star", ctx=int(given["ctx.length"]), kv_dtype=d, ttft_s=float(len(ran)),
                                  decode_tok_s=80.0, planned_peak_bytes_per_rank=[1 << 30],
                                  peak_mem_bytes_per_rank=[1 << 30], chunk=int(c) if c else None, phase1_passes=1)  # fmt: skip
                    f.write(json.dumps(record) + "\n")
        return "python runner.py " + " ".join(opts)

    monkeypatch.setattr(kv, "_bench", fake_bench)
    results = tmp_path / "kv.jsonl"
    results.write_text(json.dumps(dict(attention="global", ctx=1 << 17, kv_dtype="auto", chunk=None)) + "\n")
    sweep = dict(contexts=[1 << 17, 1 << 18], strategies=["star"], results=results)
    with pytest.raises(subprocess.CalledProcessError):
        kv.bench_kv(common.Recorder(None), **sweep)
    runs, chunked = kv.bench_kv(common.Recorder(None), **sweep)
    lengths = [dict(o.split("=", 1) for o in opts)["ctx.length"] for opts in ran]
    assert lengths == ["131072", "262144", "262144", "262144", "131072"]  # the 128K sweep ran once
    assert sorted((row[1], row[2]) for row in runs.rows) == sorted((n, d) for n in (1 << 17, 1 << 18)
                                                                   for d in ("bf16", "fp8", "int8"))  # fmt: skip
    assert {row[0] for row in runs.rows} == {"star"}
    assert len(chunked.rows) == 4 + 2  # 128K: the default, one pass, 8K and 4K; 256K: the default, one pass
    assert "ctx.length=131072" in runs.command and "ctx.length=262144" in runs.command


def test_a_sweep_resumed_runs_only_the_kv_dtypes_and_chunks_it_lacks(monkeypatch, tmp_path):
    """A context's sweep cut after some of its KV dtypes (or chunks) runs again only the missing ones, while the
    tables' command names the whole sweep."""
    import json

    from longctx.tools.bench import common, kv

    def record(n, d="auto", c=None):
        return dict(attention="star", ctx=n, kv_dtype=d, chunk=c, ttft_s=1.0, decode_tok_s=80.0, phase1_passes=1,
                    planned_peak_bytes_per_rank=[1 << 30], peak_mem_bytes_per_rank=[1 << 30])  # fmt: skip

    ran = []

    def fake_bench(results, *opts):
        ran.append(opts)
        given = dict(o.split("=", 1) for o in opts)
        with open(results, "a") as f:
            for d in given.get("kv.dtype", "auto").split(","):
                for c in given.get("ctx.chunk", "").split(","):
                    f.write(json.dumps(record(int(given["ctx.length"]), d, int(c) if c else None)) + "\n")
        return ""

    monkeypatch.setattr(kv, "_bench", fake_bench)
    short, long = 1 << 15, 1 << 17
    held = [record(short), record(short, "fp8"), record(short, c=8192), record(long, c=long)]
    held += [record(long, d) for d in ("auto", "fp8", "int8")]
    results = tmp_path / "kv.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in held))
    runs, chunked = kv.bench_kv(common.Recorder(None), [short, long], ["star"], results=results)
    assert [dict(o.split("=", 1) for o in opts) for opts in ran] == [
        {"attention": "star", "task.warmup": "1", "ctx.length": str(short), "kv.dtype": "int8"},
        {"attention": "star", "task.warmup": "1", "ctx.length": str(short), "ctx.chunk": f"{short},4096"},
    ]
    assert [(row[1], row[2]) for row in runs.rows] == [(n, d) for n in (short, long) for d in ("bf16", "fp8", "int8")]
    assert [(row[1], row[2].split()[0]) for row in chunked.rows] == [
        (short, "65536"),
        (short, str(short)),
        (short, "8192"),
        (short, "4096"),
        (long, "131072"),
        (long, "65536"),
    ]  # (measured in another order: one pass first, then smaller chunks)
    assert "kv.dtype=auto,fp8,int8" in runs.command and f"ctx.chunk={short},8192,4096" in chunked.command


@pytest.mark.parametrize(
    "name,params,world,windows",
    [
        ("global", {}, 1, (None, 64)),
        ("ring", {}, 2, (None,)),
        ("star", {"block_size": 96}, 1, (None, 64)),
        ("star", {"block_size": 96, "anchor_mode": "recompute"}, 3, (None,)),
        ("star", {"block_size": 100, "anchor_size": 30}, 2, (None,)),
    ],
)
def test_phase1_flops_count_the_pairs_each_rank_attends(name, params, world, windows):
    """The MFU count against the pairs the strategies' own phase-1 masks let attend, rank by rank."""
    from longctx import attention
    from longctx.models import ModelArgs, random_model
    from longctx.tasks.bench import phase1_flops

    args = ModelArgs(
        vocab_size=64,
        dim=32,
        n_layers=len(windows),
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_seq_len=512,
        layer_windows=windows,
    )
    n = 430
    pairs, tokens = 0, 0
    for r in range(world):
        s = attention.build(name, **params).at(r, world)
        pos = s.context_indices(n)
        tokens += pos.numel()
        for w in windows:
            if name == "ring":  # every shard's queries against every shard's keys
                masks = [attention.kernels.PositionMask(pos, kv, w) for kv in attention.ring.zigzag_shards(n, world)]
            else:
                kv = torch.cat([torch.arange(s.anchor_size), pos]) if name == "star" and s.receives_anchor else pos
                masks = [
                    attention.kernels.PositionMask(
                        pos, kv, w, params.get("block_size"), s.anchor_size if name == "star" else 0
                    )
                ]
            pairs += sum(int(m.dense().sum()) for m in masks)
    strategy = attention.build(name, **params).at(0, world)
    model = random_model(args, torch.float32, "cpu", strategy)
    linear = sum(p.numel() for k, p in model.named_parameters() if k.startswith("layers"))
    assert phase1_flops(model, strategy, n) == 2 * linear * tokens + 4 * 8 * 4 * pairs


def test_a_planted_cache_makes_hsr_read_the_planted_share_and_answer_as_dense():
    """The premise of `hsr-model`'s planted rows, on a tiny model on CPU: after planting, a certified selection
    reads the planted blocks, the sink and the recent tokens' blocks and nothing else, and its greedy tokens equal
    dense decode's over the same cache."""
    from longctx import attention
    from longctx.models import ModelArgs, random_model
    from longctx.models.generate import generate_tokens

    args = ModelArgs(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64, max_seq_len=4096
    )
    prompt = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    params = dict(block=16, sink=16, recent=64, eps=1e-3)
    runs = {}
    for decode in ("dense", "hsr"):
        method = attention.build_decode({"name": decode} | (params if decode == "hsr" else {}))
        model = random_model(args, torch.float32, "cpu", attention.build("global", decode=method))
        it = generate_tokens(model, prompt, 6, context_len=2900, cuda_graphs=False)
        first = next(it)
        plant_model_cache(model, 0.1, block=16, sink=16, strength=4096.0)
        runs[decode] = ([first, *it], model.attention.decode_report())
    tokens, report = runs["hsr"]
    assert tokens == runs["dense"][0]
    assert report["hsr_max_certificate"] <= 1e-3
    blocks = -(-3005 // 16)
    planted = len(range(1, (3000 - 1024) // 16, 10))
    floor = (planted + 1) / blocks  # the planted blocks and the sink
    # besides them, only the blocks of the recent tokens (64 and the new ones): the unplanted tail scores too low
    assert floor <= report["hsr_blocks_read_share"] <= floor + 7 / blocks


def test_a_benchmark_told_to_stop_unwinds_so_its_runner_is_killed_and_awaited():
    """SIGTERM (a time limit) becomes SystemExit, which makes subprocess.run kill its child and wait for it."""
    import os
    import signal
    import sys

    before = signal.getsignal(signal.SIGTERM)
    try:
        benchmarks.exit_on_sigterm()
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            subprocess.run([sys.executable, "-c", "import time; time.sleep(30)"])  # (the signal lands here at latest)
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)


def test_chunks_compare_with_the_one_pass_of_their_own_process(monkeypatch, tmp_path):
    """The chunked table's ratio is against the one pass run beside the chunks (ctx.chunk = the context), not the
    default's one pass from another process."""
    import json

    from longctx.tools.bench import common, kv

    ttft = {None: 1.0, 1 << 15: 1.1, 8192: 1.21, 4096: 1.32}

    def fake_bench(results, *opts):
        given = dict(o.split("=", 1) for o in opts)
        with open(results, "a") as f:
            for d in given.get("kv.dtype", "auto").split(","):
                for c in given.get("ctx.chunk", "").split(","):
                    chunk, n = int(c) if c else None, int(given["ctx.length"])
                    f.write(json.dumps(dict(
                        attention="star", ctx=n, kv_dtype=d, chunk=chunk, ttft_s=ttft.get(chunk, 1.0), decode_tok_s=80.0,
                        phase1_passes=-(-n // (chunk or 65536)), planned_peak_bytes_per_rank=[1 << 30],
                        peak_mem_bytes_per_rank=[1 << 30],
                    )) + "\n")  # fmt: skip
        return ""

    monkeypatch.setattr(kv, "_bench", fake_bench)
    _, chunked = kv.bench_kv(common.Recorder(None), [1 << 15, 1 << 17], ["star"], results=tmp_path / "kv.jsonl")
    ratio = {row[2].split()[0]: row[4] for row in chunked.rows if row[1] == 1 << 15}
    assert ratio["8192"] == pytest.approx(1.1) and ratio["4096"] == pytest.approx(1.2)
