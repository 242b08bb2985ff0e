"""The schema of every option, declared once: dataclasses whose fields give each option its type, default, range and
doc (`option`), checked against a composed config by `check_node`.

Each room declares the options it owns beside the code that reads them: the run's own in preflight/options.py, a
strategy its `attention.params` (attention/star.py), a decode method its `decode.*` (attention/hsr.py), a task its
`task.*` (tasks/generate.py). preflight/options.py checks a run against all of them and keeps only the checks that
cross options or read files. A check that fails raises `OptionError` naming the option and the fix.

Hydra composes the YAML of conf/ as it is; the schema is applied after composition, strictly (5 is not a string,
[1, 2] not a list of strings, 1 not true), so that a bad value stops the run with one line and exit code 2 rather
than with Hydra's own error.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass, make_dataclass
from typing import Any, Callable


class OptionError(ValueError):
    """An option or input file that cannot work; the message names it and the fix."""


def option(
    default: Any = MISSING,
    doc: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | None = None,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is an option: its default (or `factory`), one line of doc, and what values it takes
    beyond its type: numbers within [low, high] (open ends with `low_open` / `high_open`), one of `choices`, or
    whatever `check(value)` finds no problem with (it returns the problem: a sentence that may name `{key}` and
    `{value}`, else said after `key=value`)."""
    meta = {
        "doc": doc,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
        "check": check,
    }
    return (
        field(default_factory=factory, metadata=meta) if factory is not None else field(default=default, metadata=meta)
    )


def check_node(schema: type, node: Any, path: str, owner: str | None = None, skip: tuple[str, ...] = ()) -> dict:
    """The options of `node` (a mapping, as composed) checked against the dataclass `schema`: an unknown key is an
    error naming `owner`'s options, each known one must have its field's type and range. `skip`: keys the node holds
    that are not options of `schema` (a group's `name`). Returns the node's options with the defaults filled in."""
    node = {} if node is None else node
    if not isinstance(node, dict):
        raise OptionError(f"{path} must be a mapping of options; got {node!r}")
    known = {f.name: f for f in fields(schema) if f.init}
    for key in node:
        if key not in known and key not in skip:
            keys = sorted({*known, *skip})
            near = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {_join(path, near[0])}? " if near else ""
            raise OptionError(
                f"{_join(path, key)} is not an option of {owner or path or 'the run'}; {hint}its options: "
                f"{', '.join(keys) or 'none'}"
            )
    hints = typing.get_type_hints(schema)
    values = {}
    for name, f in known.items():
        if name in node:
            values[name] = check_value(_join(path, name), node[name], hints[name], f.metadata)
        elif f.default_factory is not MISSING or f.default is not MISSING:
            values[name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return values


def schema_of(cls: type, exclude: tuple[str, ...] = ()) -> type:
    """The dataclass of the options `cls` takes: `cls` itself where its constructor is a dataclass's, else one made
    from its constructor's parameters (their annotations as types, no ranges), less those named in `exclude`."""
    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    if "__dataclass_fields__" in vars(owner) and not exclude:
        return cls
    try:
        hints = typing.get_type_hints(owner.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve here: that option takes any value
        hints = {}
    params = [
        p for p in inspect.signature(cls).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    specs = [
        (p.name, hints.get(p.name, Any), field(default=p.default) if p.default is not p.empty else field())
        for p in params
        if p.name not in exclude
    ]
    return make_dataclass(f"{cls.__name__}Options", specs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_value(key: str, value: Any, kind: Any, meta: Any = None) -> Any:
    """`value` if it is of type `kind` (int, float, bool, str, a list of them, a dict, a dataclass, Optional of any)
    and within the field's range (`option`); else an OptionError naming `key`."""
    meta = meta or {}
    kind, nullable = _unwrap(kind)
    if value is None:
        if nullable:
            return None
        raise OptionError(f"{key} must be {_describe(kind, meta)}; got None")
    if is_dataclass(kind):
        return check_node(kind, value, key)
    if typing.get_origin(kind) is list:
        return _check_list(key, value, typing.get_args(kind)[0], meta, nullable)
    if not _is_instance(value, kind):
        raise OptionError(f"{key} must be {_describe(kind, meta)}{' or null' if nullable else ''}; got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise OptionError(f"{key} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if kind in (int, float) and not _in_range(value, meta):
        raise OptionError(f"{key} must be {_describe(kind, meta)}{' or null' if nullable else ''}; got {value!r}")
    _custom(key, value, meta)
    return value


def check_fields(obj: Any) -> None:
    """Every option of a dataclass instance within its type and range (for `__post_init__`: a constructor checks
    what the schema declares, named by the field)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.init and f.metadata:
            check_value(f.name, getattr(obj, f.name), hints[f.name], f.metadata)


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation, Optional or `X | None` included."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(kind))
    return kind, kind is Any


def _is_instance(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(kind) or kind
    return isinstance(value, origin)


def _check_list(key: str, value: Any, item: Any, meta: dict, nullable: bool) -> list:
    if isinstance(value, str) and item is str:
        raise OptionError(f"{key} must be a list of strings: write {key}=[{value!r}] for one; got the string {value!r}")
    if not isinstance(value, (list, tuple)) or not all(_is_instance(v, item) for v in value):
        _custom(key, value, meta)  # a check of its own says best what the list must hold
        raise OptionError(
            f"{key} must be a list of {_NAMES.get(item, 'values')}{' or null' if nullable else ''}; got {value!r}"
        )
    _custom(key, list(value), meta)
    return list(value)


def _custom(key: str, value: Any, meta: dict) -> None:
    problem = meta["check"](value) if meta.get("check") else None
    if problem:
        raise OptionError(
            problem.format(key=key, value=repr(value)) if "{key}" in problem else f"{key}={value!r} {problem}"
        )


def _in_range(value: float, meta: dict) -> bool:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        return False
    return high is None or (value < high if meta.get("high_open") else value <= high)


_NAMES = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}


def _describe(kind: Any, meta: dict) -> str:
    low, high = meta.get("low"), meta.get("high")
    if kind is int:
        return (
            "a whole number"
            + (f" >= {low}" if low is not None else "")
            + (f" and <= {high}" if high is not None else "")
        )
    if kind is float:
        if low is None and high is None:
            return "a finite number"
        left = f"{'(' if meta.get('low_open') else '['}{low if low is not None else '-inf'}"
        right = f"{high if high is not None else 'inf'}{')' if meta.get('high_open') or high is None else ']'}"
        return f"a finite number in {left}, {right}"
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    if kind is dict or typing.get_origin(kind) is dict:
        return "a mapping"
    return getattr(kind, "__name__", str(kind))
