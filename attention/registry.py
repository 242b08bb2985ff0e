"""Strategies and decode methods by name: each class registers itself when it is defined. A name not registered yet
is looked for in the module attention/NAME.py, then in every module of attention/, so that a new one needs only its
own file and its conf/ yaml."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def lookup(registry: dict[str, type], name: str, what: str) -> type:
    """`registry[name]`, importing the modules of attention/ that may define it first where it is missing."""
    if name not in registry and isinstance(name, str) and name.isidentifier():
        _import(f"{__package__}.{name}")
    if name not in registry:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if not module.name.endswith("_triton"):  # (kernels only; they need Triton)
                _import(f"{__package__}.{module.name}")
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]


def _import(module: str) -> None:
    if module in sys.modules:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
