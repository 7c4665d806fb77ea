"""Metrics end to end, checked by a real Prometheus.

A live sizewise server (real uvicorn on a loopback port, a two-tier Deployment of the tiny test
checkpoints behind the adaptive router) is scraped every second by a real Prometheus server
(Debian's package; scripts/ensure_prometheus.sh installs it when missing) started here on
loopback with a config derived from configs/prometheus/prometheus.yml and a temp storage dir.
Traffic goes through the official `openai` client; what Prometheus then answers on its HTTP API
must equal what the responses reported (usage, finish reasons, routing decisions), and the engine
counters it follows (preemptions, speculative tokens) must equal the engine's own. `promtool`
(same package) checks the exposition and the scrape config, and every metric the Grafana
dashboard queries must exist, with the right type, in Prometheus's own view of the scrape.

The large tier gets a KV cache of a few blocks and four batch slots, so one request with n=6
both queues (waiting > 0) and preempts (KV full) for certain. A step listener (the engine's
public hook) holds the engine worker at the first step where that request has sequences running
and waiting, so the gauges are read while the state is known, not raced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml

from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.models.config import ModelConfig
from sizewise.orchestrator.config import PolicyConfig
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig, EngineSection, ModelEntry
from sizewise.platform import get_platform
from sizewise.server import ServerThread, create_app

from conftest import NEEDS_PROMETHEUS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "sizewise.json"
PROM_CONFIG = ROOT / "configs" / "prometheus" / "prometheus.yml"
ENSURE = ROOT / "scripts" / "ensure_prometheus.sh"

MAX_LEN = 512
PEAK_GBPS = 10.0  # configured, so the deployment does not spend a copy benchmark at startup
LARGE_KV_BLOCKS = 8  # the large tier's whole KV cache: 128 tokens
LARGE_SEQS = 4
BURST_N, BURST_TOKENS = 6, 40  # 6 x ~50 tokens on 8 blocks x 16 tokens with 4 slots: queues and preempts
REPEAT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"

# The list: every one must be scraped, with this type.
EXPECTED = {
    "sizewise_time_to_first_token_seconds": "histogram",
    "sizewise_inter_token_latency_seconds": "histogram",
    "sizewise_e2e_request_latency_seconds": "histogram",
    "sizewise_request_queue_time_seconds": "histogram",
    "sizewise_probe_seconds": "histogram",
    "sizewise_requests_total": "counter",
    "sizewise_request_errors_total": "counter",
    "sizewise_prompt_tokens_total": "counter",
    "sizewise_generation_tokens_total": "counter",
    "sizewise_route_decisions_total": "counter",
    "sizewise_route_slo_promised_total": "counter",
    "sizewise_route_slo_missed_total": "counter",
    "sizewise_spec_decode_draft_tokens_total": "counter",
    "sizewise_spec_decode_accepted_tokens_total": "counter",
    "sizewise_num_preemptions_total": "counter",
    "sizewise_num_requests_running": "gauge",
    "sizewise_num_requests_waiting": "gauge",
    "sizewise_kv_cache_usage_ratio": "gauge",
    "sizewise_achieved_bandwidth_bytes_per_second": "gauge",
    "sizewise_bandwidth_utilization_ratio": "gauge",
    "sizewise_peak_bandwidth_bytes_per_second": "gauge",
    "sizewise_device_memory_used_bytes": "gauge",
    "sizewise_plan_share": "gauge",
    "sizewise_plan_utilization_target": "gauge",
    "sizewise_plan_utilization_predicted": "gauge",
    "sizewise_device_load_utilization": "gauge",
    "sizewise_device_busy_ratio": "gauge",
    "sizewise_plan_replans_total": "counter",
    "sizewise_plan_moves_total": "counter",
}


# ----- Prometheus: installed, started, always stopped -----------------------------------------------
@pytest.fixture(scope="module")
def prom_bins() -> tuple[str, str]:
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        if os.geteuid() != 0:  # the one skip of the suite: a system binary a non-root run cannot install
            pytest.skip(f"{NEEDS_PROMETHEUS}: prometheus/promtool are not on PATH and installing them needs root")
        # Bounded: apt on a cold mirror takes a minute or two, never this long.
        r = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"cannot install Prometheus ({ENSURE}): {r.stderr[-2000:]}")
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        pytest.fail("prometheus / promtool still not on PATH after scripts/ensure_prometheus.sh")
    return prom, tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape_config(target: str) -> dict:
    """The shipped config, pointed at the test server and scraped every second."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "sizewise")
    job["static_configs"] = [{"targets": [target]}]
    return cfg


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def prometheus(prom_bins, server, tmp_path_factory):
    """A real Prometheus on a free loopback port scraping the test server; yields its base URL."""
    prom, _ = prom_bins
    work = tmp_path_factory.mktemp("prometheus")
    cfg_path = work / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(_scrape_config(server.removeprefix("http://"))))
    log_path = work / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [prom, f"--config.file={cfg_path}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                if proc.poll() is None:
                    pytest.fail(f"Prometheus not ready within 30 s: {log_path.read_text()[-2000:]}")
                continue  # it exited (port taken?): try another port
            yield url
            return
        finally:
            _stop(proc)
    pytest.fail(f"Prometheus did not start: {log_path.read_text()[-2000:]}")


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def scalar(prom: str, expr: str) -> float | None:
    res = query(prom, expr)
    return float(res[0]["value"][1]) if res else None


def by_labels(prom: str, expr: str, *labels: str) -> dict[tuple, float]:
    return {tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1]) for s in query(prom, expr)}


def wait_for(what: str, fn, timeout: float = 20.0):
    """Poll `fn` until it returns something truthy (Prometheus scrapes once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# ----- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(checkpoints):
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared box
    paths = {"small": checkpoints["llama"], "large": checkpoints["llama_tied_linear"]}  # one tokenizer
    cfg = DeploymentConfig(
        models=[ModelEntry(name=f"tiny-{t}", tier=t, path=str(p)) for t, p in paths.items()],
        device="cpu", engine=EngineSection(max_model_len=MAX_LEN),
        policy=PolicyConfig(router="adaptive", peak_bandwidth_gbps=PEAK_GBPS),
    )
    platform = get_platform("cpu")
    large_block = ModelConfig.from_pretrained(paths["large"]).kv_bytes_per_token(torch.float32) * 16
    cores = {
        "tiny-small": EngineCore(paths["small"], EngineConfig(device="cpu", max_model_len=MAX_LEN, block_size=16,
                                                              kv_cache_bytes=4 << 20), platform, name="tiny-small"),
        "tiny-large": EngineCore(paths["large"], EngineConfig(device="cpu", max_model_len=MAX_LEN, block_size=16,
                                                              max_num_seqs=LARGE_SEQS,
                                                              kv_cache_bytes=LARGE_KV_BLOCKS * large_block),
                                 platform, name="tiny-large"),
    }
    cores["tiny-large"].attach_draft(cores["tiny-small"])  # as Deployment.from_config does: small drafts for large
    dep = Deployment(cfg, cores)
    yield dep
    dep.shutdown()


@pytest.fixture(scope="module")
def server(deployment):
    with ServerThread(create_app(deployment)) as url:
        yield url


class _HoldWhenQueued:
    """Step listener: holds the engine worker at the first step of `core_name` with sequences
    both running and waiting, until released (bounded, so it can never wedge the engine)."""

    def __init__(self, core_name: str) -> None:
        self.core_name = core_name
        self.held = threading.Event()
        self.release = threading.Event()
        self.stats = None

    def __call__(self, name, core, outputs, seconds) -> None:
        if name != self.core_name or self.held.is_set():
            return
        st = core.stats()
        if st.num_running > 0 and st.num_waiting > 0:
            self.stats = st
            self.held.set()
            self.release.wait(30)


def _metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def traffic(server, prometheus, deployment):
    """Send every kind of request once; return what the responses reported (the reference)."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    seen = {"usage": Counter(), "finished": Counter(), "decisions": Counter(), "jobs": Counter(), "probed": 0}

    def note(sizewise: dict, usage, reasons: list[str], n: int = 1) -> None:
        decisions = sizewise.get("prompts", [sizewise])
        for d in decisions:
            seen["decisions"][(d["tier"], d["reason"])] += 1
            seen["jobs"][d["tier"]] += 1
            # every `auto` request's probe (its model prefill or only its features), not a pinned scan
            seen["probed"] += bool(d.get("probe")) and d.get("reason") != "pinned"
        tier = decisions[0]["tier"]
        assert all(d["tier"] == tier for d in decisions), "one tier per response keeps usage attributable"
        seen["usage"][("prompt", tier)] += usage.prompt_tokens
        seen["usage"][("completion", tier)] += usage.completion_tokens
        for r in reasons:
            seen["finished"][(tier, r)] += 1

    r = client.completions.create(model="auto", prompt="def add(a, b):", max_tokens=6, temperature=0)
    note(r.model_extra["sizewise"], r.usage, [c.finish_reason for c in r.choices])
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 2+2?"}],
                                       max_tokens=5)
    note(r.model_extra["sizewise"], r.usage, [c.finish_reason for c in r.choices])
    r = client.completions.create(model="large", prompt=["import os\n", "for i in range(3):"], max_tokens=4)
    note(r.model_extra["sizewise"], r.usage, [c.finish_reason for c in r.choices])
    # Every token id stops it, after min_tokens: finish_reason "stop" whatever the weights say.
    r = client.completions.create(model="small", prompt="import sys\n", max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": list(range(320)), "min_tokens": 2})
    note(r.model_extra["sizewise"], r.usage, [c.finish_reason for c in r.choices])
    # Prompt lookup on a repetitive prompt: the spec-decode counters get real proposals.
    chunks = list(client.completions.create(
        model="small", prompt=REPEAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"sizewise": {"strategy": "pld"}, "ignore_eos": True}))
    note(chunks[-1].model_extra["sizewise"], chunks[-1].usage,
         [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason])
    for bad in ({"model": "small", "temperature": -1}, {"model": "nope"}):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(prompt="x", max_tokens=2, **bad)
        seen.setdefault("errors", Counter())[str(e.value.status_code)] += 1
    # Not model requests: they must not count as request errors.
    assert httpx.get(server + "/no/such/path", timeout=10).status_code == 404
    assert httpx.post(server + "/health", timeout=10).status_code == 405

    # The burst on the large tier, held at a step where it both runs and waits.
    hold = _HoldWhenQueued("tiny-large")
    deployment.engine.step_listeners.append(hold)
    box: dict = {}

    def burst() -> None:
        try:
            box["r"] = client.completions.create(model="large", prompt="The quick brown fox", n=BURST_N,
                                                 max_tokens=BURST_TOKENS, temperature=1.0, seed=1,
                                                 extra_body={"ignore_eos": True})
        except BaseException as e:  # noqa: BLE001 - re-raised on the test thread
            box["e"] = e

    t = threading.Thread(target=burst)
    t.start()
    try:
        assert hold.held.wait(30), "the burst never had sequences running and waiting at once"
        seen["held_stats"] = hold.stats
        seen["held_text"] = httpx.get(server + "/metrics", timeout=10).text
        seen["held_scrape"] = _metric_samples(seen["held_text"])
        # ... and Prometheus sees the same state in a scrape that began while the worker was held
        # (timestamp() is the sample's scrape time; an earlier scrape may show the burst mid-admission).
        held_at = time.time()
        sel = '{tier="large"}'
        wait_for("a scrape while the burst is held", lambda: (
            scalar(prometheus, f"timestamp(sizewise_num_requests_waiting{sel})") or 0) > held_at)
        seen["held_prom"] = {"waiting": scalar(prometheus, f"sizewise_num_requests_waiting{sel}"),
                             "running": scalar(prometheus, f"sizewise_num_requests_running{sel}"),
                             "kv": scalar(prometheus, f"sizewise_kv_cache_usage_ratio{sel}"),
                             "vllm": by_labels(prometheus, '{__name__=~"vllm:num_requests_.*|vllm:kv_cache_usage_perc"}',
                                               "__name__", "model_name")}
    finally:
        hold.release.set()
        deployment.engine.step_listeners.remove(hold)
        t.join(60)
    if "e" in box:
        raise box["e"]
    r = box["r"]
    note(r.model_extra["sizewise"], r.usage, [c.finish_reason for c in r.choices])

    seen["generated"] = sum(v for (kind, _), v in seen["usage"].items() if kind == "completion")
    # Counters only grow: once Prometheus holds the final total, its latest scrape is after the traffic.
    wait_for("the final generation-token total in Prometheus", lambda: scalar(
        prometheus, "sum(sizewise_generation_tokens_total)") == seen["generated"])
    return seen


# ----- the tests -----------------------------------------------------------------------------------
def test_prometheus_scrapes_generation_tokens(prometheus, traffic):
    assert scalar(prometheus, 'up{job="sizewise"}') == 1.0
    targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
    total = scalar(prometheus, "sum(sizewise_generation_tokens_total)")
    assert total is not None and total > 0
    assert total == traffic["generated"]


def test_counters_agree_with_traffic(prometheus, traffic, deployment):
    usage = traffic["usage"]
    prompt = by_labels(prometheus, "sum by (tier) (sizewise_prompt_tokens_total)", "tier")
    generated = by_labels(prometheus, "sum by (tier) (sizewise_generation_tokens_total)", "tier")
    assert prompt == {(t,): float(v) for (k, t), v in usage.items() if k == "prompt"}
    assert generated == {(t,): float(v) for (k, t), v in usage.items() if k == "completion"}
    finished = by_labels(prometheus, "sum by (tier, finished_reason) (sizewise_requests_total)", "tier",
                         "finished_reason")
    assert {k: v for k, v in finished.items() if v} == {k: float(v) for k, v in traffic["finished"].items()}
    assert {r for _, r in traffic["finished"]} >= {"length", "stop"}
    # Every reason of every tier exists from the start (at 0 until its first event), so rate() sees the first.
    assert set(finished) == {(t, r) for t in ("small", "large") for r in ("stop", "length", "abort")}
    decisions = by_labels(prometheus, "sizewise_route_decisions_total", "tier", "reason")
    assert decisions == {k: float(v) for k, v in traffic["decisions"].items()}
    errors = by_labels(prometheus, "sizewise_request_errors_total", "status")
    # Only the model requests' errors: not the 404 of an unknown path, nor a 405 on /health.
    assert {k: v for k, v in errors.items() if v} == {(s,): float(v) for s, v in traffic["errors"].items()} == {
        ("400",): 1.0, ("404",): 1.0}
    assert set(errors) >= {(s,) for s in ("400", "404", "429", "500", "503", "504")}
    # One observation per routed prompt: latency histograms per tier, the probe once per route.
    jobs = {(t,): float(v) for t, v in traffic["jobs"].items()}
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert by_labels(prometheus, f"sum by (tier) (sizewise_{h}_count)", "tier") == jobs, h
        # _count equals the +Inf bucket: the buckets Prometheus stores are the histogram's own.
        assert by_labels(prometheus, f'sum by (tier) (sizewise_{h}_bucket{{le="+Inf"}})', "tier") == jobs, h
    assert scalar(prometheus, "sizewise_probe_seconds_count") == traffic["probed"] > 0
    assert scalar(prometheus, "sizewise_probe_seconds_sum") > 0
    itl = by_labels(prometheus, "sum by (tier) (sizewise_inter_token_latency_seconds_count)", "tier")
    assert set(itl) == set(jobs) and all(v > 0 for v in itl.values())


def test_engine_counters_are_followed(prometheus, traffic, deployment):
    stats = deployment.engine.stats()
    tiers = deployment.model_to_tier
    preempt = by_labels(prometheus, "sizewise_num_preemptions_total", "model", "tier")
    assert preempt == {(m, tiers[m]): float(s.num_preemptions) for m, s in stats.items()}
    assert preempt[("tiny-large", "large")] > 0  # the burst overflowed the large tier's 8 KV blocks
    # A series per proposer a model can run: pld on both, draft only where a draft model is attached
    # (the large tier; the small tier, the cheapest, never has one, so no permanent-NaN panel for it).
    runs = {m: (s.spec is not None, s.spec is not None and s.spec.draft is not None)
            for m, s in deployment.cores.items()}
    assert runs == {"tiny-small": (True, False), "tiny-large": (True, True)}
    for metric, field in (("draft", "spec_draft_tokens"), ("accepted", "spec_accepted_tokens")):
        got = by_labels(prometheus, f"sizewise_spec_decode_{metric}_tokens_total", "model", "strategy")
        want = {(m, strat): float(n) for m, s in stats.items() for strat, n in getattr(s, field).items()
                if strat == "pld" or runs[m][1]}
        assert got == want, metric
        assert ("tiny-small", "draft") not in got
    assert stats["tiny-small"].spec_draft_tokens["pld"] > 0  # the pld request proposed for real


def test_gauges_follow_the_engine(prometheus, traffic, deployment):
    held, scrape = traffic["held_stats"], traffic["held_scrape"]
    lab = (("model", "tiny-large"), ("tier", "large"))
    # Read while the worker was held: the scrape saw exactly the engine's state.
    assert scrape[("sizewise_num_requests_running", lab)] == held.num_running > 0
    assert scrape[("sizewise_num_requests_waiting", lab)] == held.num_waiting > 0
    assert scrape[("sizewise_kv_cache_usage_ratio", lab)] == pytest.approx(held.kv_blocks_used / LARGE_KV_BLOCKS)
    assert held.kv_blocks_used > 0
    prom = traffic["held_prom"]
    assert (prom["running"], prom["waiting"]) == (held.num_running, held.num_waiting)
    assert prom["kv"] == pytest.approx(held.kv_usage)
    # Idle now: nothing running or waiting anywhere, the engine's KV blocks all free.
    wait_for("idle gauges", lambda: scalar(prometheus, "sum(sizewise_num_requests_running) + "
                                                       "sum(sizewise_num_requests_waiting)") == 0)
    # Bandwidth: achieved > 0 after traffic; utilisation is achieved / the configured peak.
    peak = scalar(prometheus, "sizewise_peak_bandwidth_bytes_per_second")
    assert peak == PEAK_GBPS * 1e9
    achieved = by_labels(prometheus, "sizewise_achieved_bandwidth_bytes_per_second", "model")
    util = by_labels(prometheus, "sizewise_bandwidth_utilization_ratio", "model")
    assert set(achieved) == set(util) == {("tiny-small",), ("tiny-large",)}
    for m, a in achieved.items():
        assert a > 0 and util[m] == pytest.approx(a / peak)
    assert scalar(prometheus, "sizewise_device_memory_used_bytes") > 0


def test_the_capacity_plan_is_scraped_as_the_router_holds_it(prometheus, traffic, deployment):
    plan = deployment.router.control.plan
    wait_for("plan gauges", lambda: by_labels(prometheus, "sizewise_plan_share", "tier") != {})
    shares = by_labels(prometheus, "sizewise_plan_share", "tier")
    assert shares == pytest.approx({(t,): plan.shares.get(t, 0.0) for t in ("small", "large")})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert scalar(prometheus, "sizewise_plan_utilization_target") == pytest.approx(plan.util_cap, abs=1e-4)
    assert scalar(prometheus, "sizewise_plan_utilization_predicted") == pytest.approx(plan.utilization, abs=1e-4)
    assert scalar(prometheus, "sizewise_plan_replans_total") == deployment.router.control.replans >= 1
    assert 0 <= scalar(prometheus, "sizewise_device_load_utilization") <= scalar(prometheus, "sizewise_device_busy_ratio") <= 1


def test_vllm_families_routers_read(prometheus, traffic, deployment):
    """The names inference routers (Gateway API Inference Extension, llm-d, vLLM's production
    stack) read from a backend, in the held state: the process series first, then one per model."""
    from prometheus_client.parser import text_string_to_metric_families

    held = traffic["held_stats"]
    fams = {f.name: f for f in text_string_to_metric_families(traffic["held_text"]) if f.name.startswith("vllm:")}
    want = {"vllm:num_requests_waiting": (held.num_waiting, 0), "vllm:num_requests_running": (held.num_running, 0),
            "vllm:kv_cache_usage_perc": (held.kv_usage, 0.0), "vllm:gpu_cache_usage_perc": (held.kv_usage, 0.0)}
    assert set(fams) == {*want, "vllm:cache_config_info"}
    for name, (large, small) in want.items():
        fam = fams[name]
        assert fam.type == "gauge"
        # Pickers keep the first series of a name: it is the unlabelled one, for the whole process
        # (the small tier is idle while the burst is held, so the process value is the large tier's).
        assert fam.samples[0].labels == {} and fam.samples[0].value == pytest.approx(large), name
        assert {s.labels["model_name"]: s.value for s in fam.samples[1:]} == pytest.approx(
            {"tiny-large": large, "tiny-small": small}), name
    assert 0 < held.kv_usage <= 1
    info = fams["vllm:cache_config_info"].samples
    blocks = {m.name: m.num_blocks for m in deployment.describe()}
    assert info[0].labels == {"block_size": "16", "num_gpu_blocks": str(sum(blocks.values()))}
    assert {s.labels["model_name"]: (s.labels["block_size"], s.labels["num_gpu_blocks"]) for s in info[1:]} == {
        m: ("16", str(n)) for m, n in blocks.items()}
    assert blocks["tiny-large"] == LARGE_KV_BLOCKS
    # A real Prometheus stores them under the same names in the scrape taken while held.
    prom = traffic["held_prom"]["vllm"]
    assert prom[("vllm:num_requests_waiting", "")] == held.num_waiting
    assert prom[("vllm:num_requests_running", "tiny-large")] == held.num_running
    assert prom[("vllm:kv_cache_usage_perc", "")] == pytest.approx(held.kv_usage)


def test_every_metric_is_exported_with_its_type(prometheus, traffic):
    meta = httpx.get(prometheus + "/api/v1/metadata", timeout=10).json()["data"]
    got = {name: meta[name][0]["type"] for name in EXPECTED if name in meta}
    assert got == EXPECTED
    names = set(httpx.get(prometheus + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    for name, kind in EXPECTED.items():
        series = [name + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [name]
        assert set(series) <= names, name
    # Bounded cardinality: no label but these, no per-request values.
    allowed = {"__name__", "instance", "job", "model", "tier", "finished_reason", "status", "reason", "strategy",
               "le"}
    for s in query(prometheus, '{__name__=~"sizewise_.*"}'):
        assert set(s["metric"]) <= allowed, s["metric"]


def test_promtool_accepts_scrape_and_configs(prom_bins, server, traffic, tmp_path):
    _, promtool = prom_bins
    text = httpx.get(server + "/metrics", timeout=10).text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool's lint wants no ':' in a name (it reserves them for recording rules); the vllm:
    # families must have it, as vLLM's own do, since routers read them by those names. Nothing else.
    vllm = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE vllm:")}
    assert r.stderr.splitlines() == sorted(f"{n} metric names should not contain ':'" for n in vllm), r.stderr
    assert len(vllm) == 5 and not r.stdout.strip()
    sizewise_only = "\n".join(line for line in text.splitlines() if "vllm:" not in line) + "\n"
    r = subprocess.run([promtool, "check", "metrics"], input=sizewise_only, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    for cfg in (PROM_CONFIG, tmp_path / "test.yml"):
        if cfg != PROM_CONFIG:
            cfg.write_text(yaml.safe_dump(_scrape_config("127.0.0.1:8000")))
        r = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    shipped = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "sizewise")
    assert job["metrics_path"] == "/metrics" and job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]


# ----- the dashboard -------------------------------------------------------------------------------
_GRAFANA_VARS = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan", "atan2"}


def _panels(items: list[dict]):
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))


def _exprs(dash: dict) -> tuple[list[str], list[str]]:
    """Panel target exprs, and the metrics of the templating `label_values(metric{...}, label)` queries."""
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    var_metrics = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q.strip())
            assert m, q
            var_metrics.append(m.group(1))
    return exprs, var_metrics


def _concrete(expr: str) -> str:
    """Grafana's variables -> values Prometheus can run: rate windows, and 'all' for the selectors."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return "30s" if name.startswith("__") else ".*"
    return _GRAFANA_VARS.sub(sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: every identifier that is not a function or
    aggregation (followed by '('), a keyword, a label inside {...} or by/without/on/ignoring (...),
    a string or a duration."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes) first
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range / subquery windows
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if m.group(2) or m.group(1) in _PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def _family_type(name: str, meta: dict) -> str | None:
    """The type Prometheus holds for the family a series name belongs to: a histogram's
    `_bucket`/`_sum`/`_count` series belong to the family without the suffix."""
    if name in meta:
        return meta[name][0]["type"]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and meta.get(base, [{}])[0].get("type") == "histogram":
            return "histogram"
    return None


def test_metric_name_parser():
    # The parser the dashboard test relies on, on the shapes the dashboard uses.
    assert metric_names('histogram_quantile(0.95, sum by (le, tier) (rate(a_bucket{tier=~"$tier"}[5m])))') == {
        "a_bucket"}
    assert metric_names('sum(rate(x_total{s="by (z)"}[1m])) / ignoring(tier) group_left sum(y) + on (m) z') == {
        "x_total", "y", "z"}
    assert metric_names("max(g) > bool 1 and up offset 5m") == {"g", "up"}


def test_dashboard_queries_exist_in_the_live_scrape(prometheus, traffic):
    dash = json.loads(DASHBOARD.read_text())
    # Importable: identity, a Prometheus data-source variable every panel and target uses.
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [v["query"] for v in ds_vars] == ["prometheus"]
    ds = {"type": "prometheus", "uid": "${%s}" % ds_vars[0]["name"]}
    panels = list(_panels(dash["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == ds and p["targets"], p["title"]
            assert all(t["datasource"] == ds for t in p["targets"]), p["title"]

    exprs, var_metrics = _exprs(dash)
    meta = httpx.get(prometheus + "/api/v1/metadata", timeout=10).json()["data"]
    live = set(httpx.get(prometheus + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        used |= names
        missing = names - live
        assert not missing, f"{expr}: {sorted(missing)} not in the scrape"
        # rate()/increase() only over counters and histogram series; bare gauges are never rated.
        for m in re.finditer(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
            assert _family_type(m.group(1), meta) in ("counter", "histogram"), (m.group(1), expr)
        for name in names:
            kind = _family_type(name, meta)
            assert kind is not None, (name, expr)
            if kind == "histogram":
                assert name.endswith(("_bucket", "_sum", "_count")), (name, expr)
        # And Prometheus itself accepts the query (with Grafana's variables filled in).
        query(prometheus, _concrete(expr))
    for sel in var_metrics:
        assert metric_names(sel) <= live and query(prometheus, _concrete(sel)), sel
    # Each concern of the issue has a panel: every metric in the list is on the dashboard.
    for name, kind in EXPECTED.items():
        series = {name + "_bucket"} if kind == "histogram" else {name}
        assert series & used, f"{name} is on no panel"
