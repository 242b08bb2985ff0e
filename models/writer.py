"""Write a Hugging Face-layout checkpoint directory atomically: shards, index, config, tokenizer files.

Everything is written into a temporary directory beside the target and renamed into place at the end, so a
failed conversion leaves nothing behind. With `verify`, every tensor is read back and compared to what was
meant to be written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

DEFAULT_SHARD_SIZE = "5GB"
VERIFY_AUTO_LIMIT = 4 << 30  # --verify defaults to on below this many bytes of weights


def parse_size(text: str) -> int:
    """'5GB', '500MB', '40KB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; write it like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * 1000 ** "BKMGT".index(unit[0]))


def prepare_target(out: Path, force: bool) -> Path:
    """Refuse an existing target without `force` (and a file even with it); return a fresh temporary directory
    beside it, after removing those of earlier runs that were killed before they could clean up."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the output is a checkpoint directory: name a directory")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish_target(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_checkpoint(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    extra_files: dict[str, str | bytes | Path] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    verify: bool | None = None,
    total: int | None = None,
    size: int | None = None,
) -> Path:
    """Write `tensors` (HF names) as safetensors shards with `config` and `extra_files` into `out`; `size`: the
    bytes the tensors will take, checked against the free space before anything is written."""
    limit = parse_size(max_shard_size)
    if size is not None:
        check_space(out, size)
    tmp = prepare_target(out, force)
    try:
        written, digests = _write_shards(tmp, _cast(tensors, dtype), limit, total)
        nbytes = sum(n for _, n in written.values())
        if dtype is not None:
            config = config | {"torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if verify if verify is not None else nbytes <= VERIFY_AUTO_LIMIT:
            verify_checkpoint(tmp, written, digests)
        finish_target(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(
                f"the disk filled while writing {out} (nothing of it was kept); free space or write elsewhere"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_space(out: Path, size: int) -> None:
    """An error naming the target unless its file system has room for `size` bytes (and 1% more for the rest)."""
    parent = out.parent if out.parent.is_dir() else Path.cwd()
    free = shutil.disk_usage(parent).free
    if size * 1.01 > free:
        raise OSError(
            f"{out}: the checkpoint takes about {size / 1e9:.2f} GB and {parent} has {free / 1e9:.2f} GB free; free "
            "space, write it elsewhere, or choose a smaller --dtype"
        )


def _cast(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors:
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()


def _digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _write_shards(
    tmp: Path, tensors, limit: int, total: int | None
) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """Returns name -> (file, bytes) and name -> digest; holds one shard's tensors at a time."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    where: dict[str, tuple[int, int]] = {}
    files: list[str] = []
    digests: dict[str, str] = {}

    def flush(i: int) -> None:
        name = f"shard-{i:05d}.safetensors"
        save_file(shards[i], tmp / name, metadata={"format": "pt"})
        files.append(name)
        for k, v in shards[i].items():
            digests[k] = _digest(v)
        shards[i] = {}

    for name, t in tqdm(tensors, desc="writing tensors", unit="tensor", total=total, disable=None):
        if name in where:
            raise ValueError(f"tensor {name!r} produced twice")
        n = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + n > limit:
            flush(len(shards) - 1)
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += n
        where[name] = (len(shards) - 1, n)
    flush(len(shards) - 1)
    count = len(files)
    final = (
        ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    for src, dst in zip(files, final):
        (tmp / src).rename(tmp / dst)
    result = {name: (final[i], n) for name, (i, n) in where.items()}
    if count > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {k: f for k, (f, _) in sorted(result.items())}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return result, digests


def verify_checkpoint(path: Path, written: dict[str, tuple[str, int]], digests: dict[str, str]) -> None:
    """Read every tensor back and compare its bytes with what was written."""
    by_file: dict[str, list[str]] = {}
    for name, (file, _) in written.items():
        by_file.setdefault(file, []).append(name)
    for file, names in tqdm(by_file.items(), desc="verifying", unit="shard", disable=None):
        with safe_open(path / file, framework="pt") as f:
            if set(f.keys()) != set(names):
                raise RuntimeError(
                    f"verification failed: {file} holds {sorted(set(f.keys()) ^ set(names))} unexpectedly"
                )
            for name in names:
                if _digest(f.get_tensor(name)) != digests[name]:
                    raise RuntimeError(f"verification failed: tensor {name!r} in {file} differs from what was written")
