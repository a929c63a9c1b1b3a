"""The design's rules a test can check (docs/design.md): no import circles among the project's
modules, counting imports inside functions; the runtime never imports torch, transformers, onnx,
optimum or the exporter and calibration packages; serving code that runs inside Triton never
imports the repository writers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("runtime", "exporter", "calibration")
BUILD_TIME = ("torch", "transformers", "onnx", "optimum", "exporter", "calibration")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import name`: the module pkg.name when there is one, else pkg (resolved below)
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in nested) for t in targets]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in _imports(name, path):
            if target.split(".")[0] in PACKAGES and (found := resolve(target)) and found != name:
                graph[name].add(found)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(m for m in _modules() if m.startswith("runtime")))
def test_the_runtime_imports_no_build_time_package(name):
    """Anywhere in the file, inside functions too: the runtime goes onto a device without them
    (`profile --reference` runs transformers in a child process, exporter/reference.py)."""
    bad = [(t, line) for t, line, _ in _imports(name, _modules()[name]) if t.split(".")[0] in BUILD_TIME]
    assert bad == []


def test_what_runs_inside_triton_never_imports_the_repository_writers():
    graph = _graph()
    inside = "runtime.serving.triton_model"
    reached, todo = set(), [inside]
    while todo:
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not reached & {"runtime.serving.repository", "runtime.serving.ensemble", "runtime.serving.model_config",
                          "runtime.serving.cli", "runtime.serving.server"}
