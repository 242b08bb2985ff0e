"""RULER-style sample generation: prose and noise haystacks, balanced tasks, prompts within their budget."""

from __future__ import annotations

import pytest

from longctx.evaluation import ruler


def count(text: str) -> int:
    """A stand-in tokenizer: one token per word or punctuation mark."""
    import re

    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def prose():
    return ruler.Haystack.from_file(ruler.DEFAULT_PROSE)


def test_prose_haystack_reads_a_folder_once_per_file(prose, tmp_path):
    assert len(prose.sentences) > 500 and prose.name.endswith("common-licenses")
    (tmp_path / "a.txt").write_text("The first sentence is here. " * 30)
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")  # a link to a file already read adds nothing
    assert len(ruler.Haystack.from_file(tmp_path).sentences) == 30


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xff\xfe latin-1 \xe9", "not a readable UTF-8 text file"),
        (b"Too short. Really.", "a haystack needs some prose"),
    ],
)
def test_bad_haystack_files_are_clear_errors(content, message, tmp_path):
    (tmp_path / "hay.txt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ruler.Haystack.from_file(tmp_path / "hay.txt")
    with pytest.raises(FileNotFoundError, match="task.haystack_file"):
        ruler.Haystack.from_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("hay", ["noise", "prose"])
def test_samples_fit_their_budget_and_every_task_weighs_the_same(hay, prose):
    haystack = prose if hay == "prose" else ruler.Haystack()
    samples = ruler.make_samples(list(ruler.TASKS), count, [600, 2000], [0.1, 0.5, 0.9], 2, haystack)
    per_task = {t: sum(s.task == t for s in samples) for t in ruler.TASKS}
    assert set(per_task.values()) == {2 * 3 * 2}  # lengths x depths x seeds, common words included
    assert len({s.key for s in samples}) == len(samples)
    longest = max(count(x) for x in haystack.sentences) if haystack.sentences else count(ruler.NOISE)
    for s in samples:
        n = count(s.context + s.query)
        assert s.length - longest - 20 < n <= s.length, (s.task, n)  # whole sentences, up to the one that would pass
        assert all(a in s.context for a in s.answers) or s.task == "cwe"
        if s.task != "cwe":
            assert (ruler.NOISE in s.context) == (hay == "noise")


def test_needles_sit_at_their_depth_in_prose(prose):
    for depth in (0.1, 0.5, 0.9):
        s = ruler.make_sample("niah_single", count, 3000, depth, 0, prose)
        at = s.context.index(s.answers[0]) / len(s.context)
        assert abs(at - depth) < 0.1
    a, b = (ruler.make_sample("niah_single", count, 1000, 0.5, seed, prose).context for seed in (0, 1))
    assert a != b  # each sample's prose starts somewhere else


def test_common_words_answers_are_the_most_common(prose):
    import collections

    s = ruler.make_sample("cwe", count, 1500, None, 3, prose)
    words = collections.Counter(w for w in s.context.split() if w.isalpha() and w.islower())
    assert set(s.answers) == {w for w, _ in words.most_common(10)}


def test_accuracy_cells_run_every_task_once_with_one_budget_per_task():
    from longctx.tools import accuracy

    for cell in accuracy.plan():
        runs = cell.runs()
        assert sorted(t for tasks, _, _ in runs for t in tasks) == sorted(accuracy.TASKS)
        budget = {t: n for tasks, n, _ in runs for t in tasks}
        assert all(n == accuracy.NEW_TOKENS for t, n in budget.items() if t != "cwe")
        assert len({path for _, _, path in runs}) == len(runs)  # a results file answers one budget
        if (cell.model, cell.length) == ("smollm2", 8192):  # cwe's longest prompt there: 8,160 of 8,192 positions
            assert 8160 + budget["cwe"] <= 8192
