"""Elementwise chains compiled into one kernel each on CUDA, eager elsewhere (the model's norms, rotary and gated
activations, the KV cache's writes).

In a decode step each op of an RMSNorm, a rotary embedding or a SwiGLU is its own kernel of a few microseconds, so an
8B model spends more time launching them than computing; compiled, each chain is one fused kernel (BENCHMARKS.md,
figure `model`, has a row without it: `with COMPILE_ELEMENTWISE.scoped(False)`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from longctx.attention.settings import Setting

COMPILE_ELEMENTWISE = Setting("compile_elementwise", True)


def fused_on_cuda(fn: Callable) -> Callable:
    """`fn` compiled by Inductor when its first argument is a CUDA tensor, eager otherwise.

    Not `fullgraph=True`: past dynamo's recompile limit (many shapes in one process) that fails hard, where this
    falls back to eager; tests/test_models.py checks that each chain traces as one graph. Compiled on first CUDA use:
    `torch.compile` imports the compiler stack, seconds that a CPU run, or a run refused before it starts, never needs.
    """
    compiled = functools.cache(lambda: torch.compile(fn))

    @functools.wraps(fn)
    def run(x: Tensor, *args):
        return compiled()(x, *args) if x.is_cuda and COMPILE_ELEMENTWISE.get() else fn(x, *args)

    return run
