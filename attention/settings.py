"""Library settings a caller may change for a scope (a measurement that compares paths), never by assigning a module
global from outside: `with FLEX_BUCKETS.scoped(None): ...` holds for that block and the calls it makes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

T = TypeVar("T")


class Setting(Generic[T]):
    """A default, read with `get()`, that `scoped(value)` replaces until its `with` block ends."""

    def __init__(self, name: str, default: T):
        self.default = default
        self._var: ContextVar[T] = ContextVar(name, default=default)

    def get(self) -> T:
        return self._var.get()

    @contextmanager
    def scoped(self, value: T) -> Iterator[T]:
        token = self._var.set(value)
        try:
            yield value
        finally:
            self._var.reset(token)
