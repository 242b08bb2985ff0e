"""The house: folders import each other in one direction only, no module reaches itself back through any chain of
imports (function-local and importlib imports included), and the library outside attention/ never asks a strategy
or decode method its name."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# Lower layers first; a folder imports only from layers before its own.
LAYERS = ["conf", "attention", "models", "parallel", "evaluation", "preflight", "tasks", "tools", "runner"]
LIBRARY = ["models", "parallel", "evaluation", "preflight", "tasks", "runner"]  # what runs a strategy it is given
NAMES = {"global", "ring", "star", "dense", "hsr", "window"}


def _modules() -> dict[str, Path]:
    """longctx.<room>[.<module>] -> file, for every Python file of the rooms (tests are not part of the package)."""
    found = {"longctx.runner": REPO / "runner.py"}
    for room in LAYERS[:-1]:
        for path in (REPO / room).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(("longctx", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it: `import`, `from ... import`, importlib with a literal."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                out.add(node.args[0].value)
    return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1]


def test_folders_import_downwards_only():
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in _graph().items()
        for b in targets
        if LAYERS.index(_room(b)) > LAYERS.index(_room(a))
    )
    assert not wrong, "imports against the layers " + " < ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_no_module_imports_itself_back():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n) :] + [n]))
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_outside_attention_never_tests_a_strategy_or_decode_name():
    asked = []
    for room in LIBRARY:
        files = [REPO / "runner.py"] if room == "runner" else sorted((REPO / room).rglob("*.py"))
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare):
                    consts = {
                        c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    }
                    if consts & NAMES:
                        asked.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not asked, "\n".join(asked)


def test_the_graph_sees_local_and_importlib_imports():
    """The checks above would pass vacuously if they missed imports: a function-local import and the importlib one of
    the Triton modules are edges."""
    graph = _graph()
    assert "longctx.attention.lean_triton" in graph["longctx.attention.lean"]
    assert "longctx.attention.hsr_triton" in graph["longctx.attention.hsr"]
    assert "longctx.models.builtin" in graph["longctx.tasks.context"]
    assert "longctx.parallel.tensor" in graph["longctx.preflight.options"]  # (a function-local import)
