"""Time below the server comes from one injectable clock (`sizewise.clock`): no `time` module call
in engine/ or orchestrator/ goes around it, or the virtual device (`sizewise.sim`) would mix wall
time into virtual time. Checked on the source, like the layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sizewise.clock import WALL, VirtualClock

PKG = Path(__file__).resolve().parents[1] / "src" / "sizewise"
CLOCKED = ("engine", "orchestrator")


def bypasses(source: str) -> list[str]:
    """Every use of the `time` module in `source`: its import, or an attribute read off it."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "time"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "time":
            bad.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "time":
            bad.append(f"{node.lineno}: time.{node.attr}")
    return bad


def test_no_time_call_bypasses_the_clock():
    files = [p for layer in CLOCKED for p in sorted((PKG / layer).rglob("*.py"))]
    assert len(files) > 10  # the rule checks what is there
    bad = [f"{p.relative_to(PKG)}:{b}" for p in files for b in bypasses(p.read_text())]
    assert bad == []


@pytest.mark.parametrize("source", [
    "import time\nt = time.perf_counter()",
    "from time import monotonic",
    "import time as t",
    "def f(time):\n    return time.time()",  # any `time.` attribute read counts
])
def test_the_checker_finds_each_bypass(source):
    assert bypasses(source)


def test_the_checker_allows_the_clock():
    assert bypasses("from ..clock import WALL\nt = self.clock.now()\nm.arrival_time = clock.time()") == []


def test_virtual_clock_moves_only_when_told():
    c = VirtualClock()
    t0, w0 = c.now(), c.time()
    c.advance(1.5)
    assert c.now() - t0 == 1.5 and c.time() - w0 == 1.5
    c.advance_to(1.0)  # an event in the past happens now: time never goes back
    assert c.now() == 1.5
    with pytest.raises(ValueError, match="cannot go back"):
        c.advance(-1)
    a, b = VirtualClock(), VirtualClock()  # two clocks are independent (no process-wide time)
    a.advance(3)
    assert b.now() == 0.0
    assert WALL.now() < WALL.now() + 1e-9
