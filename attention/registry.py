"""Strategies and decode methods by name: each class registers itself when it is defined; a name not yet registered
is looked for in the module attention/NAME.py, so that a new one needs only its own file and its conf/ yaml."""

from __future__ import annotations

import importlib


def lookup(registry: dict[str, type], name: str, what: str) -> type:
    """`registry[name]`, importing attention/`name`.py first where it is missing."""
    if name not in registry and isinstance(name, str) and name.isidentifier():
        module = f"{__package__}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]
