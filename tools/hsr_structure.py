"""What a certified sparse decode can skip on real attention: the blocks `decode=hsr` reads against the fewest any
certified selection could read, on a real model (CPU): ACCURACY.md.

    python tools/hsr_structure.py --model smollm2 --length 4096      # measures, saves accuracy/hsr/, rewrites the table
    python tools/hsr_structure.py --report                             # the table again from what is saved

A prompt of `--length` tokens of prose (the licence texts) ends in a question; at its decode query, every layer's
query and KV cache are captured (global attention, fp32). Then, for each block size and eps, per layer and KV head:

* hsr: the share of visible key blocks `attention.hsr.hsr_attend` reads (its per-channel box bound, rounds of
  doubling, the sink and recent blocks always read) until its certificate is at most eps;
* oracle: the fewest blocks any selection needs for the unread softmax mass to be at most eps of the read mass, with
  blocks taken in order of their exact mass. No summary of a block can certify with fewer: it is the floor;
* looseness: the median over blocks of (the bound − the block's true best score), in nats. A bound loose by x nats
  counts each unread key as e^x times its real weight;
* certificate holds: the true unread/read mass ratio (from the dense log-sum-exp) is at most the certificate on every
  head, as attention/hsr.py proves it must be.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from longctx.attention.hsr import KeySummary, hsr_attend, score_bounds
from longctx.attention.strategy import GlobalAttention
from longctx.models.generate import prefill

RESULTS = REPO / "accuracy" / "hsr"
DOC = REPO / "ACCURACY.md"
BEGIN, END = "<!-- hsr structure: tools/hsr_structure.py -->", "<!-- end of hsr structure -->"
BUILTIN = {"smollm2": "smollm2", "gemma3_270m": "gemma3-270m"}  # preset -> built-in model (models/builtin.py)
QUESTION = "\n\nThe pass key is 48213. Remember it. What is the pass key?"
PROSE = Path("/usr/share/common-licenses")  # the licence texts every Debian-family machine holds


class _Capture(GlobalAttention):
    """Global attention that keeps each layer's decode query, KV cache and mask."""

    def __init__(self):
        super().__init__()
        self.layers: list[tuple] = []

    def attend(self, q, k, v, kv, step, window):
        out = super().attend(q, k, v, kv, step, window)
        if self.phase == "query":
            self.layers.append((q.clone(), kv.k.clone(), kv.v.clone(), step.masks[window]))
        return out


def capture(model_name: str, length: int) -> tuple[list[tuple], torch.Tensor]:
    """Every layer's (q, k, v, mask) at the decode query of a `length`-token prose prompt, and the cache positions."""
    from longctx import models
    from longctx.models.builtin import BUILTINS

    model, tok = models.load(BUILTINS[BUILTIN[model_name]](), dtype=torch.float32)
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(PROSE.iterdir()) if p.is_file())
    question = tok.encode(QUESTION, add_special_tokens=False)
    ids = tok.encode(text)[: length - len(question)] + question
    strategy = _Capture()
    model.attention = strategy
    cache = model.setup_cache(1, len(ids))
    with torch.inference_mode():
        prefill(model, torch.tensor(ids), len(ids) - 1)
    return strategy.layers, cache.positions.clone()


def _oracle_blocks(scores: torch.Tensor, block: int, eps: float, always: torch.Tensor) -> int:
    """Fewest blocks (the `always` ones included) leaving unread mass <= eps of the read mass for every query row
    of scores [rows, S], blocks taken in order of their largest exact mass over the rows."""
    rows, S = scores.shape
    nb = -(-S // block)
    padded = torch.nn.functional.pad(scores, (0, nb * block - S), value=-math.inf).view(rows, nb, block)
    mass = torch.logsumexp(padded, -1)  # [rows, nb]
    seen = torch.isfinite(mass).any(0)
    order = mass.amax(0).masked_fill(always, math.inf).masked_fill(~seen, -math.inf).argsort(descending=True)
    lo, hi = max(1, int((always & seen).sum())), int(seen.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        read = torch.zeros(nb, dtype=torch.bool)
        read[order[:mid]] = True
        rest = torch.logsumexp(mass[:, ~read & seen], -1) if (~read & seen).any() else torch.full((rows,), -math.inf)
        if bool((torch.exp(rest - torch.logsumexp(mass[:, read], -1)) <= eps).all()):
            hi = mid
        else:
            lo = mid + 1
    return lo


def measure(layers: list[tuple], kv_pos: torch.Tensor, block: int, eps: float, sink: int, recent: int) -> dict:
    read = oracle = visible = 0
    gaps: list[torch.Tensor] = []
    holds, worst = True, 0.0
    for q, k, v, mask in layers:
        D, Hkv = q.shape[-1], k.shape[1]
        g = q.shape[1] // Hkv
        summary = KeySummary.of(k, kv_pos, block)
        r = hsr_attend(q, k, v, mask, summary, eps, sink, recent)
        allowed = mask.dense()  # [1, S]
        scores = (torch.einsum("bhtd,bhsd->bhts", q.view(1, Hkv, g, D) * D**-0.5, k)).masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, -1).view_as(r.lse)
        ratio = torch.expm1(lse - r.lse)  # the true unread mass over the read mass
        holds &= bool((ratio <= r.certificate * (1 + 1e-5) + 1e-9).all())
        worst = max(worst, float(r.certificate.max()))
        read += int(r.blocks_read.sum())
        visible += int(r.blocks_visible) * Hkv
        nb = summary.count.numel()
        first = int(mask.q_pos.min())
        blocks_seen = (summary.count > 0) & (summary.pmin <= first)
        if mask.window is not None:
            blocks_seen &= summary.pmax > first - mask.window
        always = blocks_seen & ((summary.pmin < sink) | (summary.pmax > first - recent))
        u = score_bounds(q, summary)[0, :, 0]  # [Hq, nb]
        for h in range(Hkv):
            oracle += _oracle_blocks(scores[0, h].reshape(g, -1), block, eps, always)
            s = torch.nn.functional.pad(
                scores[0, h].reshape(g, -1), (0, nb * block - scores.shape[-1]), value=-math.inf
            )
            best = s.view(g, nb, block).amax(-1)  # [g, nb]
            finite = torch.isfinite(best)
            gaps.append((u[h * g : (h + 1) * g] - best)[finite])
    return {
        "block": block,
        "eps": eps,
        "hsr_share": read / visible,
        "oracle_share": oracle / visible,
        "looseness_nats": float(torch.cat(gaps).median()),
        "certificate_holds": holds,
        "max_certificate": worst,
        "layers": len(layers),
    }


def table(rows: list[dict]) -> str:
    lines = [
        BEGIN,
        "",
        "| model | context | block | eps | blocks read, hsr (box bound) | fewest any certified selection reads | bound looseness (median, nats) | certificate held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['length']:,} | {r['block']} | {r['eps']:g} | {r['hsr_share']:.1%} | "
            f"{r['oracle_share']:.1%} | {r['looseness_nats']:.1f} | {'yes' if r['certificate_holds'] else 'NO'} |"
        )
    lines += [
        "",
        "`python tools/hsr_structure.py --model MODEL --length N` (CPU, fp32; sink 64 and recent 256 tokens always read; "
        "shares over every layer and KV head at one decode query).",
        END,
    ]
    return "\n".join(lines)


def report() -> None:
    rows = sorted(
        (row for p in sorted(RESULTS.glob("*.json")) for row in json.loads(p.read_text())),
        key=lambda r: (r["model"], r["length"], r["block"], r["eps"]),
    )
    text = DOC.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table(rows) + rest.split(END, 1)[1]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## HSR: what a certified sparse decode can skip on real attention\n\n"
            + table(rows)
            + "\n"
        )
    DOC.write_text(text)
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BUILTIN), default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--eps", default="0.001,0.01,0.1")
    parser.add_argument("--block", default="16,64")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the saved results")
    args = parser.parse_args(argv)
    if not args.report:
        layers, kv_pos = capture(args.model, args.length)
        rows = [
            measure(layers, kv_pos, int(b), float(e), args.sink, args.recent)
            | {"model": args.model, "length": args.length}
            for b in args.block.split(",")
            for e in args.eps.split(",")
        ]
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{args.model}-{args.length}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(out)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
