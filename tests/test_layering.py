"""The layering that must hold (docs/architecture.md), read from the source with ``ast``:

- ``ledger/`` and ``crypto/`` import nothing of ours outside themselves;
- ``client/`` never imports ``server/``;
- no import circle among our modules, counting imports inside functions too (a lazy
  import hides a circle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "client", "crypto", "ledger")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_scan_sees_imports_inside_functions(graph: dict[str, set[str]]) -> None:
    # a mutation check on the scanner itself: the CLI imports its commands' work lazily
    assert "server.market.audit" in graph["server.cli.market"]
    assert "ledger.entries" in graph["ledger.audit"]


@pytest.mark.parametrize("package", ["ledger", "crypto"])
def test_ledger_and_crypto_import_nothing_of_ours_outside_themselves(
    graph: dict[str, set[str]], package: str
) -> None:
    bad = {m: sorted(t for t in deps if t.split(".")[0] != package)
           for m, deps in graph.items() if m.split(".")[0] == package}
    assert {m: d for m, d in bad.items() if d} == {}


def test_client_never_imports_server(graph: dict[str, set[str]]) -> None:
    bad = {m: sorted(t for t in deps if t.split(".")[0] == "server")
           for m, deps in graph.items() if m.split(".")[0] == "client"}
    assert {m: d for m, d in bad.items() if d} == {}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    # a package's __init__ that re-exports its submodules is not a circle unless a
    # submodule imports the package back
    assert strongly_connected(graph) == []
