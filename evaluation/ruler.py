"""RULER-style synthetic long-context tasks (Hsieh et al., 2024), generated locally and scored like RULER.

Needle-in-a-haystack (single, multi-key, multi-value, multi-query), variable tracking and common-words extraction,
each sized to a token budget with the model's tokenizer. Every sample is a context, a query and the reference
answers; the score is RULER's: the fraction of references found in the prediction (case-insensitive).

The haystack is either RULER's repeated noise sentence (`noise`), or real prose (`Haystack.from_file`), as RULER's
essay variant has: sentences of a text file taken from a random place, which makes retrieval harder than noise.
The default prose is the licence texts every Debian-family machine holds under /usr/share/common-licenses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "apple river stone cloud forest candle mirror garden silver rocket violin anchor marble window dragon "
    "pepper castle meadow harbor lantern feather planet saddle tunnel whistle basket comet desert falcon glacier "
    "island jungle kettle ladder magnet napkin orchard parrot quartz ribbon spider throne umbrella velvet wagon"
).split()


DEFAULT_PROSE = Path("/usr/share/common-licenses")


@dataclass
class Sample:
    task: str
    length: int  # the token budget the context was built for
    depth: float | None  # where the needles sit (fraction of the context); None for tasks without needles
    context: str
    query: str
    answers: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def key(self) -> str:
        """What names the sample among the others of a run (for resuming)."""
        return f"{self.task}/{self.length}/{self.depth}/{self.seed}"


class Haystack:
    """The filler text around the needles: sentences cut from prose, or RULER's noise sentence repeated."""

    def __init__(self, sentences: list[str] | None = None, name: str = "noise"):
        self.sentences, self.name = sentences, name

    @classmethod
    def from_file(cls, path: str | Path) -> "Haystack":
        """Prose from a text file, or from every text file of a folder (in name order, links read once)."""
        path = Path(path)
        if path.is_dir():
            files = sorted({f.resolve() for f in path.iterdir() if f.is_file()})
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"task.haystack_file={path} does not exist; name a text file or a folder of them")
        text = []
        for f in files:
            try:
                text.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError) as e:
                raise ValueError(f"task.haystack_file: {f} is not a readable UTF-8 text file ({e})") from e
        # Sentences, with line breaks inside them folded into spaces (prose, not layout).
        sentences = [re.sub(r"\s+", " ", s).strip() + " " for s in re.split(r"(?<=[.!?])\s+", "\n".join(text))]
        sentences = [s for s in sentences if len(s) > 2]
        if len(sentences) < 20:
            raise ValueError(f"task.haystack_file={path} holds {len(sentences)} sentences; a haystack needs some prose")
        return cls(sentences, str(path))

    def fill(self, count_tokens, budget: int, rng: random.Random) -> list[str]:
        """Pieces of text of at most about `budget` tokens: whole sentences, up to the one that would pass it."""
        if self.sentences is None:
            return [NOISE] * max(1, budget // max(1, count_tokens(NOISE)))
        parts, used, i = [], 0, rng.randrange(len(self.sentences))
        while True:
            sentence = self.sentences[i % len(self.sentences)]
            used += count_tokens(sentence)
            if used > budget and parts:
                return parts
            parts.append(sentence)
            i += 1


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of reference answers that appear in the prediction."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def _haystack(count_tokens, length: int, needles: list[str], depth: float, rng: random.Random, hay: Haystack) -> str:
    """Haystack text filling at most about `length` tokens, with the needles inserted around `depth`."""
    parts = hay.fill(count_tokens, length - sum(count_tokens(n) for n in needles), rng)
    at = round(depth * len(parts))
    for needle in needles:
        parts.insert(min(len(parts), at + rng.randint(0, 1)), needle)
    return "".join(parts)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}. "


def make_sample(
    task: str, count_tokens, length: int, depth: float | None, seed: int, hay: Haystack | None = None
) -> Sample:
    hay = hay or Haystack()
    rng = random.Random(f"{task}-{length}-{depth}-{seed}")
    if task.startswith("niah"):
        keys = [_key(rng) for _ in range(4)]
        values = {k: [_value(rng)] for k in keys}
        asked = keys[:1]
        if task == "niah_single":
            keys = keys[:1]
        elif task == "niah_multivalue":
            keys = keys[:1]
            values[keys[0]] = [_value(rng) for _ in range(4)]
        elif task == "niah_multiquery":
            asked = keys
        needles = [_needle(k, v) for k in keys for v in values[k]]
        rng.shuffle(needles)
        if task == "niah_multivalue":
            query = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        elif task == "niah_multiquery":
            query = f"What are all the special magic numbers for {', '.join(asked[:-1])}, and {asked[-1]} mentioned in the provided text?"
        else:
            query = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        answers = [v for k in asked for v in values[k]]
        intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
        query = f"\n\n{query} The special magic numbers are"
        context = _haystack(count_tokens, length - count_tokens(intro + query), needles, depth, rng, hay)
        return Sample(task, length, depth, intro + context, query, answers, seed)
    if task == "vt":
        value = str(rng.randint(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, 4)]
        query = f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: the variables are"
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        context = _haystack(count_tokens, length - count_tokens(intro + query), chain, depth, rng, hay)
        return Sample(task, length, depth, intro + context, query, names, seed)
    if task == "cwe":
        common = rng.sample(WORDS, 10)
        rare = [w for w in WORDS if w not in common]
        intro = "Below is a numbered list of words.\n\n"
        query = "\n\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words appearing most often in the list are:"
        budget = length - count_tokens(intro + query)

        def listing(words: list[str]) -> str:
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

        # Enough words for the budget (numbered entries cost more tokens as the numbers grow), then the longest
        # prefix of the shuffled list that fits.
        per_word = count_tokens(listing(["apple"] * 2000)) / 2000
        words: list[str] = []
        while len(words) < 1.2 * budget / per_word + 33:
            words += common * 3 + rng.sample(rare, 3)
        rng.shuffle(words)
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count_tokens(listing(words[:mid])) <= budget else (lo, mid - 1)
        return Sample(task, length, None, intro + listing(words[:lo]), query, common, seed)
    raise ValueError(f"unknown RULER task {task!r}; available: {', '.join(TASKS)}")


def make_samples(
    tasks, count_tokens, lengths: list[int], depths: list[float], samples: int, hay: Haystack | None = None
) -> list[Sample]:
    """Every task at every length and needle depth, `samples` seeds each. Common-words extraction has no needle, so
    no depth: it gets as many seeds as a needle task has (depth, seed) pairs, so that every task weighs the same."""
    out = []
    for task in tasks:
        for length in lengths:
            cells = (
                [(d, s) for d in depths for s in range(samples)]
                if task != "cwe"
                else [(None, s) for s in range(len(depths) * samples)]
            )
            out += [make_sample(task, count_tokens, length, depth, seed, hay) for depth, seed in cells]
    return out


def table(rows: list[dict]) -> str:
    """Mean score per task and length, as a text table."""
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    lines = ["task".ljust(18) + "".join(f"{n:>10}" for n in lengths)]
    for t in tasks:
        cells = []
        for n in lengths:
            s = [r["score"] for r in rows if r["task"] == t and r["length"] == n]
            cells.append(f"{100 * sum(s) / len(s):>9.1f}%" if s else f"{'-':>10}")
        lines.append(t.ljust(18) + "".join(cells))
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path) -> Path:
    """PNG of needle-task accuracy over context length x needle depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = [r for r in rows if r["depth"] is not None]
    lengths = sorted({r["length"] for r in needle})
    depths = sorted({r["depth"] for r in needle})
    grid = [[0.0] * len(lengths) for _ in depths]
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            s = [r["score"] for r in needle if r["depth"] == d and r["length"] == n]
            grid[i][j] = 100 * sum(s) / len(s) if s else float("nan")
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.6 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center")
    fig.colorbar(im, ax=ax, label="accuracy %")
    ax.set_title("needle tasks: accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
