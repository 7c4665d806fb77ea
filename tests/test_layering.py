"""The layers of DESIGN.md, checked on the source: data flows top to bottom, never back up.

    server/ -> orchestrator/ -> engine/ -> models/ -> platform/

A layer imports only layers below it, and the server only the orchestrator ("the server talks
to the orchestrator only; it knows nothing about KV blocks"). The modules both sides share
(errors, outputs, sampling parameters, chat rendering, metrics and their recorder) sit below
every layer and import none. The virtual device (`sim/`) sits above the orchestrator, beside the
server, and nothing in the production path imports it. Every import counts, including those inside functions and
TYPE_CHECKING blocks: each one is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sizewise"
LAYERS = ("server", "orchestrator", "engine", "models", "platform")  # top to bottom
SHARED = ("errors", "outputs", "sampling_params", "chat", "text", "metrics", "recorder", "clock")
SIM = "sim"  # the virtual device: may use every layer, used by none
# What the server may use of the layers below it.
SERVER_MAY_IMPORT = ("orchestrator",)
# The deployment's insides: server code reading these has gone around the orchestrator's API.
DEPLOYMENT_INSIDES = {"engine", "cores", "runner", "block_manager", "scheduler", "telemetry", "model_to_tier",
                      "tier_to_model"}


def _module(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(source: str, module: tuple[str, ...], is_package: bool = False) -> list[tuple[tuple[str, ...], int]]:
    """Every `sizewise...` module `source` imports (absolute or relative), with its line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(tuple(a.name.split(".")), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module[:-1]
                base = base[: len(base) - (node.level - 1)]
            else:
                base = ()
            target = base + (tuple(node.module.split(".")) if node.module else ())
            # `from .. import engine` imports the module sizewise.engine
            found += [(target + (a.name,), node.lineno) for a in node.names] if not node.module else [
                (target, node.lineno)]
    return [(m, line) for m, line in found if m[:1] == ("sizewise",)]


def violations(source: str, module: tuple[str, ...], is_package: bool = False) -> list[str]:
    """What in `source` (the module `module`, e.g. ("sizewise", "server", "app")) breaks the layering."""
    own = module[1] if len(module) > 1 else None
    bad = []
    for target, line in imports(source, module, is_package):
        to = target[1] if len(target) > 1 else None
        if to == SIM and (own in LAYERS or own in SHARED):
            bad.append(f"{'.'.join(module)}:{line} imports {'.'.join(target)}: the virtual device is not in the "
                       "production path")
        if own in SHARED and to in LAYERS:
            bad.append(f"{'.'.join(module)}:{line} imports {'.'.join(target)}: shared modules import no layer")
        if own in LAYERS and to in LAYERS and to != own:
            if LAYERS.index(to) < LAYERS.index(own):
                bad.append(f"{'.'.join(module)}:{line} imports {'.'.join(target)}: a layer above it")
            elif own == "server" and to not in SERVER_MAY_IMPORT:
                bad.append(f"{'.'.join(module)}:{line} imports {'.'.join(target)}: the server talks to the "
                           "orchestrator only")
    if own == "server":
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in DEPLOYMENT_INSIDES:
                bad.append(f"{'.'.join(module)}:{node.lineno} reads .{node.attr}: the deployment's insides")
    return bad


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path, _module(path)


def test_every_module_keeps_to_its_layer():
    bad = []
    for path, module in _sources():
        bad += violations(path.read_text(), module, path.name == "__init__.py")
    assert bad == []


def test_layers_and_shared_modules_exist():
    """The rule checks what is there: a renamed layer would make it vacuous."""
    names = {m[1] for _, m in _sources() if len(m) > 1}
    assert set(LAYERS) | set(SHARED) <= names
    assert any(len(m) > 2 and m[1] == "server" for _, m in _sources())


@pytest.mark.parametrize("source, module, expected", [
    ("from ..engine.core import EngineCore", ("sizewise", "server", "serving"), "the server talks to the orchestrator"),
    ("def f():\n    from sizewise.platform import get_platform", ("sizewise", "server", "app"),
     "the server talks to the orchestrator"),
    ("from .. import engine", ("sizewise", "server", "app"), "the server talks to the orchestrator"),
    ("x = dep.engine.add_request", ("sizewise", "server", "serving"), "reads .engine"),
    ("n = dep.cores['a'].block_manager.num_blocks", ("sizewise", "server", "app"), "reads .cores"),
    ("from ..server.errors import ApiError", ("sizewise", "orchestrator", "deployment"), "a layer above it"),
    ("from ..orchestrator import types", ("sizewise", "engine", "core"), "a layer above it"),
    ("from .engine.core import EngineCore", ("sizewise", "outputs"), "shared modules import no layer"),
    ("from ..sim.runner import SimRunner", ("sizewise", "engine", "core"), "the virtual device is not in"),
    ("from .engine.core import EngineCore", ("sizewise", "clock"), "shared modules import no layer"),
])
def test_the_checker_finds_each_kind_of_violation(source, module, expected):
    found = violations(source, module)
    assert any(expected in f for f in found), found


@pytest.mark.parametrize("source, module", [
    ("from ..orchestrator.types import Prompt\nfrom ..errors import InvalidRequestError", ("sizewise", "server", "run")),
    ("from . import protocol as P\napp.router.add_api_route('/x', f)", ("sizewise", "server", "app")),
    ("from ..engine.core import EngineCore\nfrom ..platform import get_platform",
     ("sizewise", "orchestrator", "deployment")),
    ("from .errors import InvalidRequestError", ("sizewise", "sampling_params")),
    ("from ..orchestrator.deployment import Deployment\nfrom ..engine.core import EngineCore", ("sizewise", "sim", "driver")),
])
def test_the_checker_allows_what_the_design_allows(source, module):
    assert violations(source, module) == []
