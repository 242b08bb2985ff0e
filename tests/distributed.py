"""Run a function on several CPU processes joined in a gloo process group, and collect what each returns."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
        dist.barrier()  # every rank done with its collectives before any tears its group down (gloo aborts otherwise)
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 300) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns each rank's result (tensors, lists, dicts)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_worker, args=(r, world, port, out, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = [(Path(out) / f"{r}.err") for r in range(world)]
        failed = [e.read_text() for e in errors if e.exists()]
        saved = all((Path(out) / f"{r}.pt").exists() for r in range(world))
        # A rank that aborts after every rank saved its result and passed the barrier dies in gloo's teardown
        # ("terminate called without an active exception", seen under load): its work is done and checked by the test.
        if failed or any(p.exitcode != 0 and not (saved and p.exitcode == -signal.SIGABRT) for p in procs):
            raise RuntimeError(f"a rank failed (exit codes {[p.exitcode for p in procs]}):\n" + "\n".join(failed))
        return [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(world)]
