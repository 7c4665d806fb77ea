"""Reliability (issue 26): no request can exhaust the server. Run against the demo family on a real
uvicorn server with httpx and raw sockets on loopback; every check is of behaviour (status, the
limit named, which connection was closed), never of a duration."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.server import ServerThread, create_app

from conftest import demo_deployment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def deployment():
    with demo_deployment(max_num_seqs=8, max_model_len=MAX_MODEL_LEN) as dep:
        yield dep


@pytest.fixture(scope="module")
def server(deployment):
    with ServerThread(create_app(deployment)) as url:
        yield url


# ----- 1: a prompt too long to fit is refused by its length in characters, before tokenizing ------
@pytest.fixture(scope="module")
def char_limit(deployment) -> int:
    # The reference: the tokenizer's longest vocabulary entry bounds the characters of one token.
    vocab = deployment.tokenizer().get_vocab()
    return MAX_MODEL_LEN * max(len(t) for t in vocab)


def _refused(r: httpx.Response, param: str, limit: int) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param, err
    assert f"limit of {limit} characters" in err["message"], err


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", lambda t: {"prompt": t, "max_tokens": 4}, "prompt"),
    ("/v1/completions", lambda t: {"prompt": ["hi", t], "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}], "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t[: len(t) // 2]}] * 2 + [
        {"role": "user", "content": [{"type": "text", "text": "x"}]}], "max_tokens": 4}, "messages"),
    ("/generate", lambda t: {"prompt": t, "params": {"max_tokens": 4}}, "prompt"),
    ("/tokenize", lambda t: {"prompt": t}, "prompt"),
    ("/tokenize", lambda t: {"messages": [{"role": "user", "content": t}]}, "messages"),
])
def test_text_longer_than_any_context_is_refused_naming_the_character_limit(http, deployment, char_limit,
                                                                             path, body, param):
    text = "y " * (char_limit // 2 + 1)  # just over the limit: ~limit/2 tokens, far over the context
    assert len(deployment.tokenizer().encode(text)) > MAX_MODEL_LEN  # so it could never have been served
    _refused(http.post(path, json=body(text)), param, char_limit)


def test_a_huge_prompt_is_refused_without_being_tokenized(http, char_limit):
    """A 4 MB prompt: main tokenized it whole (seconds, gigabytes for 50 MB) before its length was
    checked. The message names the character count only the pre-tokenizing check knows."""
    text = "y " * 2_000_000
    r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 4})
    _refused(r, "prompt", char_limit)
    assert f"has {len(text)} characters" in r.json()["error"]["message"]


def test_text_within_the_character_limit_is_still_served(http, deployment):
    ok = http.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    # long in characters but few tokens (runs of spaces merge): under the bound, so it is tokenized and served
    text = "x" + " " * 40 * 100
    n = len(deployment.tokenizer().encode(text))
    assert len(text) > MAX_MODEL_LEN and n < MAX_MODEL_LEN
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200 and r.json()["count"] == n


def test_detokenize_is_bounded_by_the_context(http):
    r = http.post("/detokenize", json={"tokens": [5] * (MAX_MODEL_LEN + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    assert str(MAX_MODEL_LEN) in r.json()["error"]["message"]


# ----- 4: slow and idle connections are released; open connections are bounded ---------------------
def _limited_server(deployment, **limits):
    from sizewise.orchestrator.deployment import ServerSection

    return ServerThread(create_app(deployment, ServerSection(**limits)))


@pytest.fixture(params=["auto", "h11"])
def http_impl(request, monkeypatch):
    """uvicorn's HTTP protocol under the guard: `auto` (httptools where installed) and pure-Python h11."""
    if request.param == "h11":
        import uvicorn.protocols.http.auto as auto
        from uvicorn.protocols.http.h11_impl import H11Protocol

        monkeypatch.setattr(auto, "AutoHTTPProtocol", H11Protocol)
    return request.param


def _connect(url: str):
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    return s


def _read_until_closed(s, patience_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (b'' if it never does in `patience_s`)."""
    import socket

    s.settimeout(patience_s)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except socket.timeout:
        return b"<still open>" + data
    return data


def test_slow_loris_header_trickle_gets_408_and_is_closed(deployment, http_impl):
    """uvicorn's keep-alive timeout is disarmed by the first byte: on main a header trickle held its
    connection for as long as it went on."""
    with _limited_server(deployment, read_timeout_s=1.0, keep_alive_s=1.0) as url:
        s = _connect(url)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        s.settimeout(0.2)
        got = b""
        for _ in range(300):  # one header byte per 0.2 s (for up to 60 s): never a whole request
            try:
                s.sendall(b"y")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # the server closed and reset the socket
                break
            if not chunk:
                break
            got += chunk
        s.close()
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert b"request_read_timeout" in got


def test_a_body_that_never_ends_gets_408(deployment, http_impl):
    with _limited_server(deployment, read_timeout_s=1.0) as url:
        s = _connect(url)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        got = _read_until_closed(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 408"), got[:200]


def _get(s, path: str) -> bytes:
    """One GET on a raw connection; the response's bytes (the server closes after a 503 of the cap)."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    s.settimeout(30)
    got = s.recv(65536)
    while got and b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _refused_by_the_cap(got: bytes, cap: int) -> None:
    assert got.startswith(b"HTTP/1.1 503"), got[:200]
    assert b"retry-after: 1" in got.lower() and b"too_many_connections" in got
    assert f"maximum of {cap} open connections".encode() in got


def test_probes_are_answered_on_a_reserve_above_the_connection_cap(deployment, http_impl):
    """A load balancer's probe must not fail exactly when the server is full of clients: above the cap
    a few connections are kept for /health, /ready and /metrics only (on main they got the cap's 503)."""
    from sizewise.server.connections import PROBE_RESERVE

    with _limited_server(deployment, keep_alive_s=60.0, max_connections=4) as url:
        full = [_connect(url) for _ in range(4)]
        reserve = [_connect(url) for _ in range(PROBE_RESERVE)]
        for s, path in zip(reserve, ["/health", "/ready", "/metrics"] * PROBE_RESERVE):
            got = _get(s, path)
            assert got.startswith(b"HTTP/1.1 200"), (path, got[:300])
            assert _get(s, "/health").startswith(b"HTTP/1.1 200")  # kept alive: a prober may reuse it
        # past the reserve too: refused at once, whatever it asks
        over = _connect(url)
        _refused_by_the_cap(_read_until_closed(over), 4)
        # any other request on a reserve connection: the cap's 503, and the connection is closed
        _refused_by_the_cap(_get(reserve[0], "/v1/models"), 4)
        assert _read_until_closed(reserve[0]) == b""
        for s in [*full, *reserve, over]:
            s.close()
    # the operator is told (`serve --help`)
    from sizewise.cli import _parser

    serve = next(a for a in _parser()._actions if a.dest == "command").choices["serve"]
    said = " ".join(next(a.help for a in serve._actions if a.dest == "max_connections").split())
    assert f"reserve of {PROBE_RESERVE} more that serve only /health, /ready and /metrics" in said


def test_idle_connections_are_closed_and_bounded(deployment, http_impl):
    from sizewise.server.connections import PROBE_RESERVE

    with _limited_server(deployment, keep_alive_s=1.0, max_connections=4) as url:
        idle = [_connect(url) for _ in range(4 + PROBE_RESERVE)]
        with httpx.Client(base_url=url, timeout=30) as c:  # one more connection, past the probes' reserve too
            over = c.get("/health")
        assert over.status_code == 503 and over.json()["error"]["code"] == "too_many_connections"
        assert over.headers["retry-after"] == "1"
        for s in idle:  # never sent a byte: closed after the keep-alive timeout, without a response
            assert _read_until_closed(s) == b""
            s.close()
        # kept alive after a response: closed after the keep-alive timeout too
        s = _connect(url)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = _read_until_closed(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 200") and b'"ok"' in got
        with httpx.Client(base_url=url, timeout=30) as c:  # the bound counts open connections only
            assert c.get("/health").status_code == 200


def test_health_is_answered_by_the_connection_layer_before_the_app(deployment, http_impl):
    """Under a burst, /health must not queue behind the app's work: a whole, bodiless GET /health is
    answered where the connection reads it (the app never sees it), with the app's own liveness
    state; what the app must judge (a Host a loopback server refuses) still reaches it."""
    app = create_app(deployment)
    seen: list[str] = []

    class Seen:  # pure ASGI: the paths that reached the app
        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.inner(scope, receive, send)
    app.add_middleware(Seen)
    with ServerThread(app) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(3):  # on one kept-alive connection
                r = c.get("/health")
                assert r.status_code == 200 and r.json() == {"status": "ok"} and r.headers["x-request-id"]
            assert c.get("/ready").status_code == 200  # the app's, after the connection layer's answers
            assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400
        s = _connect(url)  # Connection: close is honoured
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        got = _read_until_closed(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 200") and json.loads(got.partition(b"\r\n\r\n")[2]) == {"status": "ok"}, got
    assert seen == ["/ready", "/health"]


# ----- 3: a request that cannot start before its deadline is refused, not left to time out ----------
@pytest.fixture(scope="module")
def one_seat():
    """The demo family's small model alone, one sequence at a time: a second request must queue."""
    cfg = DeploymentConfig.from_yaml(CONFIG)
    cfg = cfg.model_copy(update={"memory_fraction": 0.05, "models": [m for m in cfg.models if m.tier == "small"],
                                 "engine": cfg.engine.model_copy(update={"max_num_seqs": 1})})
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        with ServerThread(create_app(dep)) as url:
            yield url
    finally:
        dep.shutdown()


LONG = {"model": "small", "prompt": "def add(a, b):", "max_tokens": 1000, "ignore_eos": True, "stream": True}


def test_a_request_that_cannot_start_in_time_is_refused_at_admission(one_seat):
    with httpx.Client(base_url=one_seat, timeout=120) as c, \
            c.stream("POST", "/v1/completions", json=LONG) as running, \
            c.stream("POST", "/v1/completions", json=LONG) as queued:
        # Both are admitted (their headers came back): the first runs, the second waits for its seat.
        assert running.status_code == 200 and queued.status_code == 200
        # A request that must start within 1 microsecond, behind one that has waited longer: refused now.
        r = c.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 2,
                                             "sizewise": {"max_latency_ms": 0.001}})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and "sizewise.max_latency_ms" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1


def test_a_queued_request_not_started_by_its_deadline_is_dropped_with_retry_after(one_seat):
    with httpx.Client(base_url=one_seat, timeout=120) as c, \
            c.stream("POST", "/v1/completions", json=LONG) as running:
        assert running.status_code == 200
        # Admitted (nothing waits before it), but the seat stays taken past its 100 ms: a 503 it can retry.
        r = c.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 2,
                                             "sizewise": {"max_latency_ms": 100}})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "queue_timeout" and r.headers["retry-after"] == "1"
    with httpx.Client(base_url=one_seat, timeout=120) as c:  # the seat is free again: served
        ok = c.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 2,
                                              "sizewise": {"max_latency_ms": 60_000}})
        assert ok.status_code == 200, ok.text


# ----- the overload floor's queue entries survive a plan move -----------------------------------------
async def test_a_request_moved_off_its_tier_leaves_no_queue_entry_behind(deployment):
    """A waiting `auto` request the capacity plan moves to another tier still leaves the queue of the
    model it was admitted on once it starts: its entry is keyed by `Job.queued_on`, which the move does
    not rewrite (the decision's model is rewritten). Keyed by the decision, the entry stayed on the old
    model after the request was served elsewhere, and that model's queue delay grew without end: about
    `max_queue_delay` later it refused every request with 503 `overloaded`. Time is scripted:
    `queue_delay` is read a minute ahead."""
    import asyncio

    from sizewise import SamplingParams
    from sizewise.metrics import Metrics
    from sizewise.orchestrator.router import AdaptiveRouter
    from sizewise.orchestrator.types import Prompt, RoutingHints
    from sizewise.server.serving import Serving, ServingOptions
    from test_orchestrator_demo import _script_arrivals, demo_prompts

    serving = Serving(Metrics(), ServingOptions(max_queue_delay_s=300.0))
    serving.set_deployment(deployment)
    items = demo_prompts(deployment.tokenizer(), 12)
    long = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    router = AdaptiveRouter(deployment.config.policy.to_settings())
    old_router, deployment.router = deployment.router, router
    router.bind(deployment)
    ctl = router.control
    loop = asyncio.get_running_loop()
    try:
        ctl.replan_arrivals = 10 ** 9
        ctl.replan_s = float("inf")  # the idle plan (large alone) holds while the burst queues
        runs = [await serving.submit([Prompt(ids)], long, "auto", RoutingHints(), f"q-mv-{i}", loop.time() + 600)
                for i, ids in enumerate(items)]
        large = deployment.tier_to_model["large"]
        assert {j.queued_on for r in runs for j in r.jobs} == {large}
        # large runs max_num_seqs (8) of them, 4 wait; an overload moves the plan off large, and them with it
        _script_arrivals(router, 2000.0)
        ctl.replan_s = 0.0
        await router.route(deployment, items[0], long, "auto", RoutingHints())
        await asyncio.gather(*(r.collect() for r in runs))
    finally:
        deployment.router = old_router
    moved = [j for r in runs for j in r.jobs if j.decision.model != large]
    assert len(moved) == len(items) - deployment.cores[large].config.max_num_seqs
    assert all(j.finished and j.queued_on == large for j in moved)
    later = loop.time() + 60
    # every request has been served: no model's queue has anyone waiting, a minute on
    assert {m: serving.queue_delay(m, later) for m in deployment.cores} == dict.fromkeys(deployment.cores, 0.0)
