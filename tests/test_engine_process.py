"""`sizewise serve --engine-process`: the engines in their own process (docs/engine-core.md).

Every test runs a real `sizewise serve --engine-process` subprocess on the demo family and talks
to it over HTTP (the official `openai` client where it is a client's view). The reference is the
in-process server on the same config, answering the same greedy requests one at a time (so both
run the same batch shapes on one torch thread). Lifecycle tests kill processes for real: the
core with SIGKILL, the API process with SIGKILL and SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Serve
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.server import ServerThread, create_app

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "The quick brown fox", "for i in range(10):"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """The demo family on a small memory budget (both servers read this one file)."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for m in raw["models"]:
        m["path"] = str((REPO / "configs" / m["path"]).resolve())
    raw["policy"]["token_stats"] = str(REPO / "configs" / raw["policy"]["token_stats"])
    raw["memory_fraction"] = 0.05
    raw["engine"].update(max_num_seqs=8, max_model_len=1024)
    path = tmp_path_factory.mktemp("engine-process") / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(config_path: Path, *extra: str) -> tuple[Serve, str]:
    server = Serve("--config", str(config_path), "--port", "0", "--device", "cpu", "--engine-process", *extra)
    try:
        return server, server.wait_ready()
    except BaseException:
        server.stop()
        _kill_core(server)
        raise


def _core_pid(server: Serve) -> int:
    m = re.search(r"engine-core process started \(pid (\d+)\)", server.log)
    assert m, server.log
    return int(m.group(1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _kill_core(server: Serve) -> None:
    """Teardown: no core may outlive a test, whatever it asserted."""
    m = re.search(r"engine-core process started \(pid (\d+)\)", server.log)
    if m and _alive(int(m.group(1))):
        try:
            os.kill(int(m.group(1)), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def remote(config_path):
    server, url = _start(config_path)
    yield server, url
    server.stop()
    _kill_core(server)


@pytest.fixture(scope="module")
def in_process(config_path, one_thread):
    dep = Deployment.load(DeploymentConfig.from_yaml(config_path), echo_plan=False)
    with ServerThread(create_app(dep)) as url:
        yield url
    dep.shutdown()


def _requests():
    """Greedy requests of every shape the API has: plain, stops, logprobs, n, echo, chat."""
    out = []
    for i, p in enumerate(PROMPTS):
        model = ("small", "medium", "large")[i % 3]
        out.append(("completion", dict(model=model, prompt=p, max_tokens=24, temperature=0)))
    out.append(("completion", dict(model="large", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["\n\n", "return"])))
    out.append(("completion", dict(model="small", prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=3)))
    # stop strings are found by the API process (the core sends token ids): cut where in process
    out.append(("completion", dict(model="large", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=["e", "\n"],
                                   logprobs=2)))
    out.append(("completion", dict(model="medium", prompt=PROMPTS[0], max_tokens=30, temperature=0, n=2, stop=["a"],
                                   extra_body={"include_stop_str_in_output": True})))
    out.append(("completion", dict(model="medium", prompt=PROMPTS[2], max_tokens=8, temperature=0, n=2,
                                   echo=True, logprobs=1)))
    out.append(("completion", dict(model="large", prompt=PROMPTS[3], max_tokens=300, temperature=0,
                                   extra_body={"sizewise": {"strategy": "pld"}})))
    out.append(("chat", dict(model="large", messages=[{"role": "user", "content": "def fib(n):"}], max_tokens=20,
                             temperature=0)))
    return out


def _answer(client: openai.OpenAI, kind: str, kw: dict, stream: bool):
    """What a client keeps of an answer: texts, finish reasons, token logprobs, usage, sizewise."""
    api = client.completions if kind == "completion" else client.chat.completions
    if not stream:
        r = api.create(**kw)
        d = r.model_dump()
        choices = []
        for c in d["choices"]:
            text = c["text"] if kind == "completion" else c["message"]["content"]
            lps = (c.get("logprobs") or {}).get("token_logprobs") if kind == "completion" else None
            choices.append((c["index"], text, c["finish_reason"], lps, c.get("stop_reason")))
        return choices, d["usage"], {k: d["sizewise"][k] for k in ("model", "tier", "strategy", "reason")}
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in api.create(**kw, stream=True):
        for c in chunk.model_dump()["choices"]:
            piece = c["text"] if kind == "completion" else (c["delta"].get("content") or "")
            texts[c["index"]] = texts.get(c["index"], "") + piece
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return sorted((i, texts[i], reasons[i]) for i in texts)


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all((x is None and y is None) or abs(x - y) <= 1e-4 for x, y in zip(a, b))


def test_outputs_equal_the_in_process_servers(remote, in_process):
    """The same greedy requests, one at a time, streamed and not: the same texts, finish reasons,
    usage and routing, and logprobs within 1e-4, through the engine-core process as in process."""
    _, url = remote
    ours = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    ref = openai.OpenAI(base_url=in_process + "/v1", api_key="x", max_retries=0)
    stopped = 0
    for kind, kw in _requests():
        got, want = _answer(ours, kind, kw, False), _answer(ref, kind, kw, False)
        assert [c[:3] + c[4:] for c in got[0]] == [c[:3] + c[4:] for c in want[0]], (kind, kw)
        stopped += sum(isinstance(c[4], str) for c in got[0])
        assert all(_close(g[3], w[3]) for g, w in zip(got[0], want[0])), (kind, kw)
        assert got[1:] == want[1:], (kind, kw)
        if not kw.get("echo"):  # (echo is not streamed)
            assert _answer(ours, kind, kw, True) == _answer(ref, kind, kw, True), (kind, kw)
    assert stopped >= 3  # the stop strings did match
    # Two prompts in one request: its prompts reach the engine one after the other, so whether they
    # share a step depends on timing (another batch shape): the contract, not the bits.
    two = ours.completions.create(model="medium", prompt=[PROMPTS[2], PROMPTS[0]], max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})
    count = lambda p: httpx.post(url + "/tokenize", json={"model": "medium", "prompt": p}).json()["count"]  # noqa: E731
    assert [(c.index, c.finish_reason) for c in two.choices] == [(0, "length"), (1, "length")]
    assert all(c.text for c in two.choices)
    assert (two.usage.prompt_tokens, two.usage.completion_tokens) == (count(PROMPTS[2]) + count(PROMPTS[0]), 20)
    def cards(base: str) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "created"} for c in httpx.get(base + "/v1/models").json()["data"]]

    assert cards(url) == cards(in_process)
    body = {"model": "large", "prompt": PROMPTS[1]}
    assert httpx.post(url + "/tokenize", json=body).json() == httpx.post(in_process + "/tokenize", json=body).json()


def test_validation_errors_are_the_in_process_ones(remote, in_process):
    """What is refused at submission (by the API process or by the core) comes back with the same
    status and body as in process."""
    _, url = remote
    bad = [
        dict(model="small", prompt="x " * 3000, max_tokens=4),  # longer than every context
        dict(model="small", prompt=PROMPTS[0], max_tokens=5000),  # past the model's context
        dict(model="nope", prompt=PROMPTS[0]),  # unknown model
        dict(model="small", prompt=PROMPTS[0], sizewise={"strategy": "draft"}),  # the draft model itself
        dict(model="small", prompt=[[5, 10**6]]),  # a token id outside the vocabulary
        dict(model="large", prompt=[[5, 2**70]]),  # ... and past what msgpack carries
        dict(model="small", prompt=PROMPTS[0], stop_token_ids=[2**70]),
        dict(model="large", prompt=PROMPTS[0], stop_token_ids=[10**6]),
        dict(model="auto", prompt=PROMPTS[0], temperature=-1),
    ]
    with httpx.Client(timeout=60) as h:
        for body in bad:
            got = h.post(url + "/v1/completions", json=body)
            want = h.post(in_process + "/v1/completions", json=body)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), body
            assert got.status_code in (400, 404), got.text


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def _engine(m: dict, name: str, model: str) -> float:
    return m[name, (("model", model), ("tier", model.removeprefix("demo-")))]


def _poll(url: str, until, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if until(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_a_disconnect_frees_the_kv_in_the_core(remote):
    """A client that goes away mid-stream: the core aborts its request (running 0, KV usage back to
    0 on /metrics) long before it could have finished: it spent well under half the device time
    the whole request needs, at the rate its first tokens cost."""
    _, url = remote
    body = {"model": "large", "prompt": PROMPTS[0], "max_tokens": 1000, "n": 4, "ignore_eos": True,
            "temperature": 0, "stream": True}
    spent = lambda m: _engine(m, "sizewise_device_seconds_total", "demo-large")  # noqa: E731
    kv = lambda m: _engine(m, "sizewise_kv_cache_usage_ratio", "demo-large")  # noqa: E731
    before = _metrics(url)
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        events, mid = [], None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(line)
                # After ~20 tokens of each of the 4 samples, a snapshot of the core (every 0.25 s) taken
                # while it runs; the stream is read meanwhile (an unread one is aborted as a slow client).
                if len(events) >= 80 and len(events) % 8 == 0:
                    mid = _metrics(url)
                    if kv(mid) > 0 and spent(mid) > spent(before):
                        break
        assert mid is not None and kv(mid) > 0 and spent(mid) > spent(before)
        assert _engine(mid, "sizewise_num_requests_running", "demo-large") == 4
    idle = _poll(url, lambda m: kv(m) == 0 and _engine(m, "sizewise_num_requests_running", "demo-large") == 0)
    assert kv(idle) == 0
    assert _engine(idle, "sizewise_num_requests_running", "demo-large") == 0
    per_token = (spent(mid) - spent(before)) / (len(events) / 4)  # device seconds per step of the 4
    assert spent(idle) - spent(before) < 0.5 * per_token * 1000
    aborted = ("sizewise_requests_total", (("finished_reason", "abort"), ("model", "demo-large"), ("tier", "large")))
    assert idle[aborted] - before.get(aborted, 0) == 4


def test_metrics_export_the_cores_engine_series(remote):
    """The engine series (device seconds, KV usage, running/waiting, the plan's gauges) come from
    the core through the API process's /metrics, read by Prometheus' own parser."""
    _, url = remote
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model="auto", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert r.choices[0].text
    tier = r.model_dump()["sizewise"]["tier"]
    m = _poll(url, lambda m: _engine(m, "sizewise_device_seconds_total", f"demo-{tier}") > 0)
    assert _engine(m, "sizewise_device_seconds_total", f"demo-{tier}") > 0
    assert _engine(m, "sizewise_device_bytes_total", f"demo-{tier}") > 0
    for name in ("sizewise_kv_cache_usage_ratio", "sizewise_num_requests_running", "sizewise_num_requests_waiting"):
        for model in ("demo-small", "demo-medium", "demo-large"):
            assert _engine(m, name, model) >= 0
    plan = r.model_dump()["sizewise"]["explain"]["plan"]  # the plan in force when the core routed it
    assert m["sizewise_plan_utilization_target", ()] == pytest.approx(plan["util_cap"])
    assert m["sizewise_plan_utilization_predicted", ()] == pytest.approx(plan["utilization"])
    shares = {dict(labels)["tier"]: v for (n, labels), v in m.items() if n == "sizewise_plan_share"}
    assert shares == pytest.approx({t: plan["shares"].get(t, 0.0) for t in ("small", "medium", "large")})
    gen = ("sizewise_generation_tokens_total", (("model", f"demo-{tier}"), ("tier", tier)))
    assert m[gen] >= 8


def test_the_core_builds_stats_only_when_a_scrape_asks(config_path, tmp_path, monkeypatch):
    """With one API process the core builds no stats snapshot on a timer (building one holds the GIL
    its worker steps with): each /metrics asks for one, which shows the core's state when asked, so
    the device seconds of a completion that just returned are in it without waiting. Counted in the
    core's step trace (SIZEWISE_TRACE_STEPS), which records every snapshot the core builds."""
    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv("SIZEWISE_TRACE_STEPS", str(trace))
    server, url = _start(config_path)
    try:
        core = _core_pid(server)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        spent = lambda m: _engine(m, "sizewise_device_seconds_total", "demo-small")  # noqa: E731
        before = _metrics(url)
        assert client.completions.create(model="small", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
        after = _metrics(url)
        assert spent(after) > spent(before)
        time.sleep(1.0)  # idle: a 0.25 s timer would build snapshots now
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log
        assert _wait_gone(core)  # the core wrote its trace as it exited
    finally:
        server.stop()
        _kill_core(server)
    built = [json.loads(line) for line in trace.read_text().splitlines() if line.startswith('["stats"')]
    assert len(built) == 2  # one per scrape


def _stream_in_thread(url: str, body: dict, out: dict, key: str, first: threading.Event | None = None) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.Client(timeout=120) as h:
                if body.get("stream"):
                    with h.stream("POST", url + "/v1/completions", json=body) as r:
                        events = []
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                                if first is not None:
                                    first.set()
                        out[key] = (r.status_code, events)
                else:
                    r = h.post(url + "/v1/completions", json=body)
                    out[key] = (r.status_code, r.json())
        except Exception as e:  # noqa: BLE001 - what the client saw is the result
            out[key] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


LONG = {"model": "large", "prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "n": 2}


def test_a_killed_core_fails_requests_with_503_and_the_server_exits_1(config_path):
    """kill -9 of the engine core mid-stream: the stream ends with an `engine_dead` error event and
    [DONE], a request waiting for its whole answer gets a 503, /health says 503, and the API
    process exits with status 1 by itself (a supervisor restarts the pair)."""
    server, url = _start(config_path)
    try:
        core = _core_pid(server)
        results: dict = {}
        first = threading.Event()
        threads = [_stream_in_thread(url, {**LONG, "stream": True}, results, "stream", first),
                   _stream_in_thread(url, LONG, results, "plain")]
        assert first.wait(60), server.log
        os.kill(core, signal.SIGKILL)
        health = None
        while health is None or health.status_code == 200:  # until the API process has noticed
            health = httpx.get(url + "/health", timeout=10)
        for t in threads:
            t.join(60)
        code = server.proc.wait(30)
    finally:
        server.stop()
        _kill_core(server)
    status, events = results["stream"]
    assert status == 200 and events[-1] == "[DONE]", events[-3:]
    err = events[-2].get("error")
    assert err is not None and err["code"] == "engine_dead", events[-2]
    status, payload = results["plain"]
    assert status == 503 and payload["error"]["code"] == "engine_dead", payload
    assert health.status_code == 503 and health.json()["status"] == "engine_dead"
    assert code == 1, server.log
    assert "killed by signal 9" in server.log


def _ipc_dir(core: int) -> Path:
    """The socket directory an engine-core process was started with (its --ipc-dir)."""
    return Path(re.search(r"--ipc-dir (\S+)", Path(f"/proc/{core}/cmdline").read_text().replace("\0", " ")).group(1))


def _sigterm_mid_stream(server, url: str) -> tuple[int, dict]:
    """SIGTERM to the server while a long stream runs; its exit status and the stream's result."""
    results: dict = {}
    first = threading.Event()
    t = _stream_in_thread(url, {**LONG, "stream": True}, results, "stream", first)
    assert first.wait(60), server.log
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    return server.proc.wait(30), results


def test_sigterm_ends_streams_with_server_shutdown_and_both_processes_exit_0(config_path):
    server, url = _start(config_path)
    try:
        core = _core_pid(server)
        ipc_dir = _ipc_dir(core)
        code, results = _sigterm_mid_stream(server, url)
        core_gone = _wait_gone(core)
    finally:
        server.stop()
        _kill_core(server)
    assert code == 0, server.log
    assert core_gone
    assert not ipc_dir.exists()
    status, events = results["stream"]
    assert status == 200 and events[-1] == "[DONE]", events[-3:]
    assert events[-2]["error"]["code"] == "server_shutdown", events[-2]
    assert "Traceback" not in server.log, server.log


def test_a_killed_api_process_leaves_no_core_behind(config_path):
    server, url = _start(config_path)
    try:
        core = _core_pid(server)
        ipc_dir = _ipc_dir(core)
        first = threading.Event()
        _stream_in_thread(url, {**LONG, "stream": True}, {}, "stream", first)
        assert first.wait(60), server.log
        server.proc.kill()
        server.proc.wait(30)
        core_gone = _wait_gone(core)
    finally:
        server.stop()
        _kill_core(server)
    assert core_gone, "the engine core outlived its API process"
    assert not ipc_dir.exists()


def test_api_server_count_2_shares_one_core_and_one_metrics_view(config_path):
    """`--api-server-count 2`: two API processes on one socket in front of one core. Whichever
    process answers a scrape, /metrics counts every request (prometheus' multiprocess mode) and
    carries the core's engine series; SIGTERM ends a stream in flight with `server_shutdown` and
    every process exits (status 0)."""
    server, url = _start(config_path, "--api-server-count", "2")
    try:
        core = _core_pid(server)
        m = re.search(r"API processes started \(pids (\d+), (\d+)\)", server.log)
        assert m, server.log
        apis = [int(m.group(1)), int(m.group(2))]
        for i in range(6):  # a connection each: the kernel hands them to either process
            with httpx.Client(timeout=60) as h:
                r = h.post(url + "/v1/completions", json={"model": "small", "prompt": PROMPTS[i % 4], "max_tokens": 4})
                assert r.status_code == 200, r.text
        for _ in range(4):
            with httpx.Client(timeout=60) as h:
                metrics = _poll(url, lambda m: _engine(m, "sizewise_device_seconds_total", "demo-small") > 0)
            done = sum(v for (n, labels), v in metrics.items()
                       if n == "sizewise_requests_total" and ("model", "demo-small") in labels)
            assert done == 6
            assert _engine(metrics, "sizewise_device_seconds_total", "demo-small") > 0
        code, results = _sigterm_mid_stream(server, url)
        gone = all(_wait_gone(pid) for pid in (core, *apis))
    finally:
        server.stop()
        _kill_core(server)
    assert code == 0, server.log
    assert gone, server.log
    status, events = results["stream"]
    assert status == 200 and events[-1] == "[DONE]", events[-3:]
    assert events[-2]["error"]["code"] == "server_shutdown", events[-2]
