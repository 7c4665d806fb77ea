"""Slow and idle connections are released; the number held open is bounded.

What covers what (uvicorn 0.3x-0.5x, h11 and httptools protocols alike):
- `timeout_keep_alive` (uvicorn): a connection idle *after a response* is closed. It is disarmed by
  the first byte of the next request, so it does not cover a request sent slowly.
- A request sent slowly (a slow-loris header trickle, a body that never ends) and a connection that
  never sends anything: nothing in uvicorn. `guarded_protocol` wraps its HTTP protocol: a fresh
  connection must start a request within the keep-alive timeout (closed silently otherwise); from a
  request's first byte, its headers must arrive within `read_timeout_s`, and then no more than
  `read_timeout_s` may pass between two reads of its body, or it is answered 408 and closed (the
  app, if it already runs, sees `http.disconnect`).
- `limit_concurrency` (uvicorn) answers 503 to *requests* over a bound but keeps every connection
  open, idle ones included: `max_connections` here refuses a connection over the bound at once
  (503 with Retry-After, then closed), so held sockets never exceed it plus `probe_reserve`.
- The reserve: `probe_reserve` connections above the cap serve only the probes (`PROBE_PATHS`), so a
  load balancer's health check does not fail exactly when the server is full of clients. Any other
  request on a reserve connection gets the cap's 503 and the connection is closed; a connection is
  a reserve one for its whole life (decided when it opens).
- Liveness (`health`): a bodiless `GET /health` that arrives whole in one read is answered here,
  before uvicorn parses it and before the app: under a burst it waits for neither a task of its own
  nor the framework, only for the event loop (in six alternated pairs of runs of
  benchmarks/reliability.py's overload part, the burst's /health p99 was lower in every pair, by
  about half). Anything else about it (a body, an upgrade, a Host the app would refuse, a request
  split across reads) goes the ordinary way, and so does every /health the app is to answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

from .errors import ApiError, read_timeout, too_many_connections

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
# A handful: a load balancer, the orchestrator's kubelet and a Prometheus scraper, each with a spare.
PROBE_RESERVE = 8


@dataclass(slots=True, frozen=True)
class ConnectionLimits:
    read_timeout_s: float = 30.0  # from a request's first byte to its last (headers and body)
    keep_alive_s: float = 5.0  # idle time allowed between requests, and before the first
    max_connections: int = 1024  # open connections; one more is refused with a 503 (bar the probes' reserve)
    probe_reserve: int = PROBE_RESERVE  # connections above max_connections that may serve PROBE_PATHS only


def _raw_response(err: ApiError) -> bytes:
    """`err` as a whole HTTP/1.1 response that closes the connection, written before any app runs."""
    body = json.dumps(err.body()).encode()
    extra = "".join(f"{k.lower()}: {v}\r\n" for k, v in err.headers.items())
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")
    return head.encode("latin-1") + body


# host -> (status, body) of /health, or None where the app must answer (see app.liveness)
Liveness = Callable[[str], "tuple[int, dict] | None"]
_HEALTH_GET = b"GET /health HTTP/1.1\r\n"
_NOT_HERE = ("content-length", "transfer-encoding", "upgrade", "expect")  # the app's to handle


def _health_fields(data: bytes) -> dict[str, str] | None:
    """The header fields of `data` if it is exactly one bodiless `GET /health` request, else None."""
    if not data.startswith(_HEALTH_GET) or not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") != 1:
        return None
    head = data[len(_HEALTH_GET):-4]  # the header lines (HTTP/1.1 has at least Host)
    if not head:
        return None
    fields = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None  # malformed: the parser answers it
        fields[name.lower()] = value.strip()
    return None if any(f in fields for f in _NOT_HERE) else fields


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits,
                     health: Liveness | None = None) -> type[asyncio.Protocol]:
    """`base` (uvicorn's H11Protocol or HttpToolsProtocol) with the read deadline, the idle timeout of
    fresh connections, the bound on open connections and, given `health`, /health answered here."""
    timeout_408 = _raw_response(read_timeout(limits.read_timeout_s))
    full = too_many_connections(limits.max_connections)
    full_503 = _raw_response(full)
    full_headers = [(k.lower().encode(), v.encode()) for k, v in full.headers.items()]
    full_body = json.dumps(full.body()).encode()

    async def refuse_all_but_probes(app, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": full.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(full_body)).encode()),
            *full_headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": full_body})

    class Guarded(base):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _idle = False  # the timer running is the fresh connection's idle timeout, not a read deadline

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            held = len(self.connections)
            if held > limits.max_connections + limits.probe_reserve:
                transport.write(full_503)
                transport.close()
                return
            if held > limits.max_connections:  # uvicorn hands each request to self.app
                self.app = partial(refuse_all_but_probes, self.app)
            self._arm(limits.keep_alive_s, idle=True)

        def data_received(self, data: bytes) -> None:
            if health is not None and self._awaiting_request() and self._answer_health(data):
                return
            if self._awaiting_request() and (self._timer is None or self._idle):
                self._arm(limits.read_timeout_s, idle=False)  # a request begins: its deadline starts
            elif self._timer is not None and not self._idle and not self._awaiting_request():
                # Body bytes: the deadline runs between reads (as nginx's client_body_timeout), so a
                # slow but flowing upload is not cut; headers keep one fixed deadline.
                self._arm(limits.read_timeout_s, idle=False)
            super().data_received(data)
            if self._timer is not None and not self._idle and not self._reading():
                self._disarm()  # received whole (or already answered): the app's time is not ours to bound

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _answer_health(self, data: bytes) -> bool:
            fields = _health_fields(data)
            answer = health(fields.get("host", "")) if fields is not None else None
            if answer is None:
                return False
            status, body = answer
            payload = json.dumps(body).encode()
            close = fields.get("connection", "").lower() == "close"
            self._unset_keepalive_if_required()  # uvicorn's idle timer: ours below replaces it
            extra = "connection: close\r\n" if close else ""
            self.transport.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\nx-request-id: {uuid.uuid4().hex[:16]}\r\n{extra}\r\n"
                .encode("latin-1") + payload)
            if close:
                self.transport.close()
            else:
                self._arm(limits.keep_alive_s, idle=True)
            return True

        def _awaiting_request(self) -> bool:
            cycle = self.cycle
            return cycle is None or cycle.response_complete

        def _reading(self) -> bool:
            """A request is arriving: its headers (no new cycle yet), or its body before any answer."""
            cycle = self.cycle
            return self._awaiting_request() or (cycle.more_body and not cycle.response_started)

        def _arm(self, seconds: float, idle: bool) -> None:
            self._disarm()
            self._idle = idle
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing() or not self._reading():
                return
            if not self._idle:
                self.transport.write(timeout_408)
            self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
