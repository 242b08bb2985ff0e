"""Decode attention speed on one GPU: the Lean kernel (with lse) against SDPA (no lse) and a fixed split.

    python tools/bench_decode.py [--out results.jsonl]

Bandwidth = bytes of K and V read / time, next to the device's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention.kernels import PositionMask  # noqa: E402
from attention.lean import BLOCK_N, lean_attend  # noqa: E402


def timed(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {sms} SMs · copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'batch':>5} {'kv':>3} {'grp':>3} {'context':>8} | {'lean us':>8} {'GB/s':>6} {'%copy':>6} | {'sdpa us':>8} {'fixed-split us':>14}")
    rows = []
    for B, hkv, group, S in [(1, 8, 4, 8192), (1, 8, 4, 32768), (1, 8, 4, 131072), (1, 8, 4, 262144), (1, 8, 4, 1048576),
                             (8, 8, 4, 32768), (8, 8, 4, 131072), (4, 1, 8, 131072), (1, 2, 8, 131072)]:  # fmt: skip
        hq = hkv * group
        q = torch.randn(B, hq, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, hkv, S, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = PositionMask(torch.tensor([S - 1], device="cuda"), torch.arange(S, device="cuda"))
        lean = timed(lambda: lean_attend(q, k, v, mask))
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        heads = B * hkv
        fixed = timed(lambda: lean_attend(q, k, v, mask, programs=heads * max(1, sms // heads)))  # per-head equal splits
        nbytes = 2 * k.numel() * k.element_size()
        row = {"batch": B, "kv_heads": hkv, "group": group, "context": S, "lean_s": lean, "sdpa_s": sdpa,
               "fixed_split_s": fixed, "lean_bytes_per_s": nbytes / lean, "copy_bytes_per_s": bw,
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "block_n": BLOCK_N}  # fmt: skip
        rows.append(row)
        print(f"{B:>5} {hkv:>3} {group:>3} {S:>8} | {lean * 1e6:>8.1f} {nbytes / lean / 1e9:>6.0f} {100 * nbytes / lean / bw:>5.0f}% | "
              f"{sdpa * 1e6:>8.1f} {fixed * 1e6:>14.1f}")  # fmt: skip
        del q, k, v
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
