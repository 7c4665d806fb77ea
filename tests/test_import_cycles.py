"""No import circle anywhere in src/: modules form a DAG, read from the source (as
tests/test_layering.py reads the layers). Every import counts, including those inside functions
and TYPE_CHECKING blocks: a circle there is still two modules that each need the other to be
read (and one refactor away from an ImportError at start-up)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_layering import PKG, imports

ROOT = PKG.parent  # src/


def _module(path: Path) -> tuple[tuple[str, ...], bool]:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return (parts[:-1], True) if parts[-1] == "__init__" else (parts, False)


def _resolve(target: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The module an import of `target` names: `from a.b import c` names a.b.c where that is a
    module, else a.b (c being an attribute of it)."""
    while target and target not in modules:
        target = target[:-1]
    return target or None


def graph(sources: dict[tuple[str, ...], tuple[str, bool]]) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """module -> modules it imports (self-imports and imports of a package by its own modules
    dropped: `from . import x` inside a package reads x, not the package)."""
    modules = set(sources)
    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for module, (source, is_package) in sources.items():
        deps = set()
        for target, _ in imports(source, module, is_package):
            got = _resolve(target, modules)
            if got is not None and got != module and module[: len(got)] != got:
                deps.add(got)
        edges[module] = deps
    return edges


def cycles(edges: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(".".join(w))
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _sources() -> dict[tuple[str, ...], tuple[str, bool]]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        module, is_package = _module(path)
        out[module] = (path.read_text(), is_package)
    return out


def test_no_import_cycle_in_src():
    assert cycles(graph(_sources())) == []


def test_the_source_graph_is_read():
    """The check reads real edges (a graph with none would pass vacuously)."""
    edges = graph(_sources())
    assert ("sizewise", "engine", "scheduler") in edges[("sizewise", "engine", "core")]
    assert ("sizewise", "engine", "spec", "rejection") in edges[("sizewise", "engine", "model_runner")]


@pytest.mark.parametrize("files, expected", [
    # the circle this test was written for: a runtime import one way, a TYPE_CHECKING one back
    ({("sizewise", "engine", "core"): "from .speculative import SpeculativeDecoder",
      ("sizewise", "engine", "speculative"): "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from .core import EngineCore"},
     [["sizewise.engine.core", "sizewise.engine.speculative"]]),
    # through a package's __init__ and a function-level import, three modules long
    ({("sizewise", "a"): "from .b import x", ("sizewise", "b"): "def f():\n    from .c import y",
      ("sizewise", "c"): "from . import a"},
     [["sizewise.a", "sizewise.b", "sizewise.c"]]),
])
def test_the_checker_finds_a_circle(files, expected):
    sources = {m: (src, False) for m, src in files.items()}
    sources[("sizewise",)] = ("", True)
    assert cycles(graph(sources)) == expected


def test_the_checker_allows_a_package_reading_its_modules():
    sources = {("sizewise",): ("from .a import x", True), ("sizewise", "a"): ("from . import b", False),
               ("sizewise", "b"): ("import os", False)}
    assert cycles(graph(sources)) == []
