"""Running the app under uvicorn: in the foreground (the CLI) or in a background thread (tests).

`ServerThread` binds its socket before uvicorn starts, so the port is known at once (port 0
picks a free one) and nothing races for it. uvicorn installs signal handlers only on the main
thread, so a thread-run server leaves the host process's Ctrl-C alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from .app import liveness
from .connections import ConnectionLimits, guarded_protocol

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an
    # accepted socket inherits its listener's. With Nagle on, a kept-alive connection's next small
    # response waited for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listen now: the URL is announced before uvicorn starts serving, and a client that
        # connects in between must wait in the backlog, not be refused.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app, log_level: str = "info", access_log: bool = True,
                   limits: ConnectionLimits | None = None) -> uvicorn.Config:
    """`limits`: the connection limits (default: those of the sizewise app's config)."""
    limits = limits or connection_limits(app)
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools where installed, else h11

    return uvicorn.Config(
        app, log_config=None, log_level=log_level, access_log=access_log, lifespan="on",
        # Streams end by themselves; a bounded grace keeps Ctrl-C from waiting on a long one.
        timeout_graceful_shutdown=5, timeout_keep_alive=limits.keep_alive_s,
        http=guarded_protocol(AutoHTTPProtocol, limits, liveness(app)),
    )


LOOP_ENV = "SIZEWISE_LOOP"  # "asyncio": the standard event loop even where uvloop is installed


def run_loop(coro):
    """Run a server's coroutine to the end on uvloop where it is installed (what uvicorn's own
    `loop="auto"` picks; `sizewise serve` runs the loop itself, so it must choose), else asyncio's
    loop. A streamed token costs the API process a task wake-up, a few callbacks and a socket
    write; uvloop does those in C. Ctrl-C behaves as with `asyncio.run`."""
    factory = None
    choice = os.environ.get(LOOP_ENV, "auto").strip().lower()
    if choice not in ("auto", "asyncio", "uvloop"):
        log.warning("%s=%r is not one of auto, asyncio, uvloop: using auto", LOOP_ENV, choice)
    if choice != "asyncio" and hasattr(asyncio, "Runner"):  # (Python >= 3.11)
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    if factory is None:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def connection_limits(app) -> ConnectionLimits:
    """The sizewise app's connection limits, from its ServerSection (defaults for another app)."""
    cfg = getattr(getattr(getattr(app, "state", None), "sizewise", None), "config", None)
    if cfg is None:
        return ConnectionLimits()
    return ConnectionLimits(read_timeout_s=cfg.read_timeout_s, keep_alive_s=cfg.keep_alive_s,
                            max_connections=cfg.max_connections)


# How much of uvicorn's graceful-shutdown window is left for the last responses to be written after
# the requests still running were failed (see Serving.begin_shutdown).
SHUTDOWN_FLUSH_S = 1.0


class Server(uvicorn.Server):
    """uvicorn's Server, telling the app when it starts to shut down (`on_shutdown(grace_s)`), so
    requests still in flight end cleanly within the graceful window rather than being cancelled
    at its end (a stream cut mid-chunk, a traceback per request)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[float], None] | None = None) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is not None:
            grace = max(0.0, (self.config.timeout_graceful_shutdown or 0) - SHUTDOWN_FLUSH_S)
            try:
                self.on_shutdown(grace)
            except Exception:  # noqa: BLE001 - the shutdown itself must go on
                log.exception("shutdown hook failed")
        await super().shutdown(sockets)
        if self.force_exit and getattr(self, "lifespan", None) is not None:
            # A second Ctrl-C: uvicorn skips the app's shutdown, and asyncio.run then cancels the
            # lifespan task (a traceback in the log, the engine never stopped). Ours is quick: run it.
            await self.lifespan.shutdown()


def shutdown_hook(app) -> Callable[[float], None] | None:
    """The sizewise app's graceful-shutdown hook (None for another ASGI app)."""
    state = getattr(getattr(app, "state", None), "sizewise", None)
    return state.serving.begin_shutdown if state is not None else None


class ServerThread:
    """A real uvicorn server for `app` on a background thread.

    with ServerThread(app) as url:   # e.g. "http://127.0.0.1:41234"
        httpx.get(url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.server = Server(uvicorn_config(app, log_level=log_level, access_log=False), shutdown_hook(app))
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        self._sock = bind_socket(self.host, self.port)
        self.url = base_url(self._sock)
        self._thread = threading.Thread(target=self._run, name="sizewise-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.01)
        return self.url

    def _run(self) -> None:
        try:
            run_loop(self.server.serve(sockets=[self._sock]))  # the loop `sizewise serve` runs
        except BaseException as e:  # noqa: BLE001 - reported to start() / stop()
            self._error = e
            log.exception("uvicorn thread failed")

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():  # a stuck connection: stop waiting for it
            self.server.force_exit = True
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
