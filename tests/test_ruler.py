"""RULER's 13 tasks from NVIDIA's package: samples equal to what its own prepare.py makes, cut where the context
ends, scored by its metrics; a missing extra or a length that cannot hold a task stops before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longctx import runner
from longctx.evaluation import ruler
from longctx.models.tokenizer import Tokenizer
from longctx.tasks.ruler import template_room
from tests.helpers import compose_cfg

LENGTH = 2048  # tests/test_runner.py runs task=ruler at this length: the samples made here are reused there


def _prepare(task: str, tokenizer_dir, length: int, samples: int, out) -> list[dict]:
    """The package's own preparation (data/prepare.py, base template), as its README runs it."""
    env = {
        **os.environ,
        "NLTK_DATA": str(ruler.sentence_model()),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # (it runs `python SCRIPT`)
    }
    cmd = [sys.executable, str(ruler.package_dir() / "data" / "prepare.py"), "--save_dir", str(out)]
    cmd += ["--task", task, "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf"]
    cmd += ["--max_seq_length", str(length), "--num_samples", str(samples), "--model_template_type", "base"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in (out / task / "validation.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "qa_1"])
def test_samples_are_what_the_packages_own_preparation_makes(task, smollm2_dir, tmp_path):
    """Essay haystack and sentence splitter (niah), variable chains, SQuAD documents: same text, same answers."""
    length = LENGTH - template_room(Tokenizer.from_dir(smollm2_dir), True)
    theirs = _prepare(task, smollm2_dir, length, 2, tmp_path)
    ours = ruler.generate(task, smollm2_dir, length, 2)
    assert [(r["input"], r["outputs"]) for r in ours] == [(r["input"], r["outputs"]) for r in theirs]
    for r in ours:
        s = ruler.cut(ruler.tasks()[task], LENGTH, r)
        assert s.text == r["input"] and s.context and s.answers == r["outputs"]
        assert s.answer_prefix.startswith(" The special magic number for " if task == "niah_single_2" else " Answer:")
        assert "\n" not in s.question.strip() or task == "qa_1"  # the question alone, after the context
        if task != "qa_1":
            assert all(a in s.context for a in s.answers)  # the needles are in the context, not the question


def test_sentences_are_split_by_the_untrained_punkt_model():
    """NLTK_DATA's English model has no parameters: sent_tokenize is PunktSentenceTokenizer() untrained, which
    also splits after an abbreviation (a trained model knows 'Dr.')."""
    code = (
        "from nltk.tokenize import sent_tokenize; from nltk.tokenize.punkt import PunktSentenceTokenizer\n"
        "t = 'I met Dr. Smith at 5 p.m. today. He said hi! Did you? Yes.'\n"
        "print(sent_tokenize(t) == PunktSentenceTokenizer().tokenize(t)); print('|'.join(sent_tokenize(t)))"
    )
    env = {**os.environ, "NLTK_DATA": str(ruler.sentence_model())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    same, split = done.stdout.splitlines()
    assert same == "True", done.stderr[-2000:]
    assert split == "I met Dr.|Smith at 5 p.m.|today.|He said hi!|Did you?|Yes."


def test_every_task_is_cut_where_its_context_ends():
    """Each of the 13 templates, filled as the generator fills it (one-needle niah in the singular), with a context
    that repeats the template's own words: the cut finds the question after the context."""
    assert list(ruler.tasks()) == list(ruler.TASKS) and len(ruler.TASKS) == 13
    for name, task in ruler.tasks().items():
        context = "What are all the special magic numbers? Answer: none. Question: Find all\n" * 3  # decoys
        filled = task._package_words(task.template).format(
            context=context, query="Q", type_needle_v="number" if task.reworded else "numbers", num_v=4
        )
        s = ruler.cut(task, 4096, {"index": 0, "input": filled, "outputs": ["x"]})
        assert s.text == filled and s.context.endswith(context), name
        assert s.question.startswith("\n") and "{" not in s.question + s.answer_prefix, name
        assert filled.endswith(s.answer_prefix) and s.answer_prefix.strip(), name


def test_scores_are_rulers_metrics():
    """string_match_all: the share of the answers in the prediction (case, control characters aside); QA's
    string_match_part: any one of them."""
    assert ruler.score("niah_multivalue", "They are 11, 22 and\x0733.", ["11", "22", "33", "44"]) == 0.75
    assert ruler.score("cwe", "APPLE pear", ["apple", "plum"]) == 0.5
    assert ruler.score("qa_2", "  Paris, France\n", ["Lyon", "france"]) == 1.0
    assert ruler.score("qa_1", "Rome", ["Lyon", "Paris"]) == 0.0
    assert ruler.postprocess(" a\tb\x00c ") == "a\nb\nc"
    rows = [{"task": t, "length": 1024, "score": s} for t, s in (("vt", 1.0), ("vt", 0.0), ("cwe", 1.0))]
    assert ruler.means(rows) == {1024: {"vt": 0.5, "cwe": 1.0, "mean": 0.75}}  # a task's mean, then their mean


def test_a_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setattr(ruler, "NEEDS", (*ruler.NEEDS, "no_such_module_for_ruler"))
    with pytest.raises(ValueError, match=r"no_such_module_for_ruler missing\): pip install -e '\.\[ruler\]'"):
        runner.validate(compose_cfg("task=ruler"))


def test_a_length_that_cannot_hold_a_task_is_refused_before_loading(smollm2_dir):
    with pytest.raises(ValueError, match="task.lengths: 150 tokens cannot hold RULER's niah_single_1"):
        runner.validate(compose_cfg("task=ruler", "task.lengths=[150]"))


def test_the_generator_is_stopped_where_it_would_loop_forever(smollm2_dir, monkeypatch):
    """RULER's scripts loop forever where a length cannot hold the task: the sizing that finds no room stops them
    at once, and a time limit stops whatever else runs too long."""
    with pytest.raises(ValueError, match="task.lengths: 200 tokens cannot hold RULER's vt"):
        ruler.generate("vt", smollm2_dir, 200, 1)
    monkeypatch.setattr(ruler, "time_limit", lambda length: 0.5)
    with pytest.raises(RuntimeError, match=r"did not finish in 0 s on fwe at 1234 tokens"):
        ruler.generate("fwe", smollm2_dir, 1234, 1)
    assert not list(ruler.CACHE_HOME.glob("ruler/samples/*fwe-1234-*"))  # nothing kept of it


def test_a_sample_a_few_tokens_too_long_answers_in_the_positions_left():
    """The generator sizes samples with its own tokenization, so a prompt made here can leave fewer positions than
    the task's answer budget: it is answered in the positions left, not refused."""
    from types import SimpleNamespace

    from longctx.models.generate import Generation
    from longctx.tasks.ruler import _answer

    asked = []

    def answer(ids, n_ctx, new, sampling):
        asked.append(new)
        return Generation("the words are apple banana cherry"), 0.1, 10.0

    sample = ruler.Sample("fwe", 8192, 0, "context", "question", "Answer:", ["apple", "banana", "cherry"])
    for room in (20, 500):
        c = SimpleNamespace(
            prompt_ids=lambda *a: (list(range(1000)), 990),
            max_seq_len=1000 + room,
            cfg=SimpleNamespace(task=SimpleNamespace(max_new_tokens=128, chat=True)),
            answer=answer,
            strategy_params=lambda: {"name": "global"},
            model=SimpleNamespace(attention=SimpleNamespace(decode_report=lambda: None)),
        )
        row = _answer(c, sample)
        assert row["score"] == 1.0 and row["max_new_tokens"] == asked[-1]
    assert asked == [20, ruler.tasks()["fwe"].tokens_to_generate]
