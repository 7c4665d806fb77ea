"""`sizewise serve`'s event loop: uvloop where installed, the standard loop when asked or missing."""

import asyncio
import sys

import uvloop

from sizewise.server.runner import LOOP_ENV, run_loop


async def _loop_type():
    return type(asyncio.get_running_loop())


def test_uvloop_by_default(monkeypatch):
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert issubclass(run_loop(_loop_type()), uvloop.Loop)


def test_the_standard_loop_when_asked_in_any_case(monkeypatch):
    for value in ("asyncio", "ASYNCIO", " asyncio "):
        monkeypatch.setenv(LOOP_ENV, value)
        assert not issubclass(run_loop(_loop_type()), uvloop.Loop), value


def test_the_standard_loop_where_uvloop_cannot_be_imported(monkeypatch):
    monkeypatch.delenv(LOOP_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert not issubclass(run_loop(_loop_type()), uvloop.Loop)


def test_an_unknown_value_is_reported_and_the_default_kept(monkeypatch, caplog):
    monkeypatch.setenv(LOOP_ENV, "off")
    with caplog.at_level("WARNING", logger="sizewise.server.runner"):
        assert issubclass(run_loop(_loop_type()), uvloop.Loop)
    assert LOOP_ENV in caplog.text and "'off'" in caplog.text
