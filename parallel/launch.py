"""Ranks for the runner: start N local workers through PyTorch's elastic launcher, or join torchrun's group.

Every collective gets a timeout, and the launcher watches the workers: a rank that fails or dies ends the whole
run with that rank's error instead of leaving the others waiting.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM: on shared machines it can take the host's GPUs out of
# service. Set in every rank before its process group starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def under_torchrun() -> bool:
    """True when an external launcher (torchrun, or ours) has set this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_ranks(backend: str, timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the process group the environment describes (if any); returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif world > 1:  # ranks on one CPU share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not dist.is_initialized():
        for switch, off in MULTICAST_OFF.items():
            os.environ.setdefault(switch, off)
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        except (RuntimeError, TimeoutError) as e:  # (torch's store and backend errors are RuntimeErrors)
            raise ValueError(
                f"the ranks could not join their process group within parallel.timeout_s={timeout_s} "
                f"({' '.join(str(e).split())[:200]}); raise parallel.timeout_s, or check that every rank can reach "
                "MASTER_ADDR:MASTER_PORT"
            ) from None
    return (dist.get_rank() if world > 1 else 0), world, device


class RankFailed(RuntimeError):
    pass


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped the run; its ranks are ended. `signum`: which."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) on `nproc` local worker processes; returns rank 0's result or raises the first failure."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, fn)(*args)
    except SignalException as e:  # the launcher ended the ranks already
        raise Interrupted(int(e.sigval)) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        detail = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        if not detail or detail.startswith("To enable traceback"):
            detail = f"exit code {failure.exitcode}" + (
                f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
            )
        raise RankFailed(f"rank {rank} failed: {detail}") from None
    return results[0]
