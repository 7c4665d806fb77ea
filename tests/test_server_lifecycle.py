"""Server lifecycle under load: shutdown on SIGTERM / SIGINT while requests stream, and request
deadlines that hold even when the client has stopped reading. Real servers (a `sizewise serve`
subprocess, or ServerThread), real HTTP clients, raw sockets for the client that never reads."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Serve
from sizewise.cli import main
from sizewise.orchestrator.deployment import (
    Deployment, DeploymentConfig, EngineSection, ModelEntry, ServerSection, StaticRouter,
)
from sizewise.server import ServerThread, create_app

REPO = Path(__file__).resolve().parents[1]
DEMO_LARGE = REPO / "models" / "demo" / "large"  # slow enough on CPU for a stream to outlast the grace
PROMPT = "def add(a, b):"


def _sse(lines) -> list:
    return [l[len("data: "):] if l == "data: [DONE]" else json.loads(l[len("data: "):])
            for l in lines if l.startswith("data: ")]


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """A client that sends its request and then never reads: its receive window stays tiny, so the
    server's sends soon block."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    # a loopback-bound server answers only Host headers that name loopback
    s.sendall(b"POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), host.encode(), port.encode(), len(data)) + data)
    return s


@pytest.mark.skipif(not (DEMO_LARGE / "config.json").is_file(), reason="demo family not built")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_ends_inflight_requests_cleanly_and_exits_0(sig):
    """What a vLLM user expects of `kill <pid>` / Ctrl-C: in-flight requests finish or fail with an
    error they can read (a final SSE error event and [DONE]; a JSON 503), never a connection cut
    mid-response; exit status 0, no traceback, and the port is free again."""
    server = Serve("--model", str(DEMO_LARGE), "--port", "0", "--device", "cpu")
    try:
        url = server.wait_ready()
        port = int(url.rsplit(":", 1)[1])
        # Far more work than the graceful-shutdown window: these cannot finish in time.
        body = {"model": "large", "prompt": PROMPT, "n": 4, "max_tokens": 1000, "ignore_eos": True}
        results: dict[str, object] = {}
        started = threading.Barrier(4)

        def stream(i: int) -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as h, \
                        h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    lines = r.iter_lines()
                    first = next(lines)
                    started.wait(30)
                    results[f"stream{i}"] = (r.status_code, _sse([first, *lines]))
            except Exception as e:  # noqa: BLE001 - what the client saw is the result
                results[f"stream{i}"] = e

        def plain() -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as h:
                    started.wait(30)
                    r = h.post("/v1/completions", json=body)
                    results["plain"] = (r.status_code, r.json())
            except Exception as e:  # noqa: BLE001
                results["plain"] = e

        clients = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        clients.append(threading.Thread(target=plain))
        for t in clients:
            t.start()
        # and a client that never reads: the shutdown must not wait on it for ever, nor log a traceback
        deaf = _raw_post(url, "/v1/completions", {**body, "n": 16, "logprobs": 5, "stream": True})
        time.sleep(1.0)  # every request is in flight
        t0 = time.monotonic()
        server.proc.send_signal(sig)
        for t in clients:
            t.join(30)
        code = server.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        server.stop()
        if "deaf" in locals():
            deaf.close()
    log = server.log
    assert code == 0, log
    assert took < 15, log  # the graceful-shutdown window is 5 s
    assert "Traceback" not in log, log
    # the deaf client's response is cut at the window's end: one warning of ours, not uvicorn's error
    assert "ASGI callable returned without completing response" not in log, log
    for name in ("stream0", "stream1", "stream2"):
        res = results[name]
        assert isinstance(res, tuple), f"{name}: {res!r}"  # not a RemoteProtocolError (cut mid-stream)
        status, events = res
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        err = events[-2].get("error") if isinstance(events[-2], dict) else None
        assert err is not None and err["code"] == "server_shutdown" and "shutting down" in err["message"], events[-2]
    res = results["plain"]
    assert isinstance(res, tuple), f"plain: {res!r}"
    status, payload = res
    assert status == 503 and payload["error"]["code"] == "server_shutdown", payload
    with socket.socket() as s:  # the port was released
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# ----- in-process servers ------------------------------------------------------------------------
MAX_LEN = 512  # the tiny checkpoints' max_position_embeddings


@pytest.fixture(scope="module")
def deployment(checkpoints, one_thread):
    cfg = DeploymentConfig(models=[ModelEntry(name="tiny", tier="small", path=str(checkpoints["llama"]))],
                           device="cpu", engine=EngineSection(max_model_len=MAX_LEN, max_num_seqs=256))
    dep = Deployment.load(cfg, router=StaticRouter("small"))
    yield dep
    dep.shutdown()


def _wait_idle(dep: Deployment, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = dep.engine.stats()["tiny"]
        if st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, f"engine never went idle: {st}"
        time.sleep(0.02)


@pytest.mark.parametrize("section, code", [
    (ServerSection(request_timeout_s=1.0), "request_timeout"),
    (ServerSection(max_queued_deltas=64), "slow_client"),  # the deadline stays 600 s
], ids=["deadline", "queue-bound"])
def test_a_stream_nobody_reads_is_aborted(deployment, section, code):
    """A client that stops reading blocks the server's writes, so nothing pulls its stream. Still
    the engine work is bounded: at request_timeout_s, or once server.max_queued_deltas deltas wait
    for the client, the request is aborted and its KV blocks freed (without either it would
    generate every token into a buffer nobody drains). When the client reads at last it gets the
    deltas before, then the error event and [DONE]; others are served meanwhile."""
    _wait_idle(deployment)
    app = create_app(deployment, section)
    # 8 prompts x 16 samples x 480 tokens with logprobs: several seconds of steps and megabytes of
    # events; the client's buffers fill within the first fraction of a second.
    body = {"model": "small", "prompt": [PROMPT] * 8, "n": 16, "max_tokens": MAX_LEN - 32, "ignore_eos": True,
            "logprobs": 5, "temperature": 1.0, "stream": True}
    full = 8 * 16 * (MAX_LEN - 32)
    before = deployment.engine.stats()["tiny"].generation_tokens_total
    with ServerThread(app) as url:
        s = _raw_post(url, "/v1/completions", body)
        try:
            deadline = time.monotonic() + 30
            while deployment.engine.stats()["tiny"].generation_tokens_total == before:  # it started
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.02)
            _wait_idle(deployment)
            assert deployment.engine.stats()["tiny"].generation_tokens_total - before < full
            with httpx.Client(base_url=url, timeout=30) as h:
                r = h.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 4})
                assert r.status_code == 200
            s.settimeout(10)
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            assert b'"code":"%s"' % code.encode() in data and b"data: [DONE]" in data, data[-500:]
            assert data.count(b'"text_completion"') > section.max_queued_deltas  # what came before was sent
        finally:
            s.close()
    _wait_idle(deployment)


def test_requests_after_the_engine_stopped_get_503_not_a_hang(checkpoints, one_thread):
    """An app serving a deployment whose engine was shut down (its owner stopped it first, or the
    worker thread ended): /health and /ready say so, and a request is refused at once with 503
    (engine_dead) instead of waiting for ever on a worker that will never admit it."""
    cfg = DeploymentConfig(models=[ModelEntry(name="tiny", tier="small", path=str(checkpoints["llama"]))],
                           device="cpu", engine=EngineSection(max_model_len=MAX_LEN))
    dep = Deployment.load(cfg, router=StaticRouter("small"))
    try:
        with ServerThread(create_app(dep)) as url, httpx.Client(base_url=url, timeout=10) as h:
            assert h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
            dep.shutdown()
            assert h.get("/health").status_code == 503
            assert h.get("/ready").status_code == 503
            for body in ({"prompt": PROMPT, "max_tokens": 2}, {"prompt": PROMPT, "max_tokens": 2, "stream": True}):
                r = h.post("/v1/completions", json=body)
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
    finally:
        dep.shutdown()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_a_one_line_error(checkpoints, capsys, port):
    assert main(["serve", "--model", str(checkpoints["llama"]), "--port", port, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "0-65535" in err and "Traceback" not in err
