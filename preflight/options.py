"""How a run's options become torch objects, and the checks on them that run before anything starts."""

from __future__ import annotations

import torch

from models.config import DTYPES


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`device=auto` is this process's GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`dtype=auto` is bf16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
