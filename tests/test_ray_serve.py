"""sizewise on a local Ray cluster (2 CPUs, two replicas at half a CPU each), driven through Ray
Serve's HTTP proxy with the official openai client: the same completions as a plain sizewise
server, the KV-pressure router sending work away from the replica that holds more KV, and a replica
whose engine died failing its health check while traffic carries on through the other one."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml
from ray import serve

from conftest import build_checkpoint
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.ray_serve import KV_RESOLUTION, REPLICA_HEADER, build_app, pressure
from sizewise.server import create_app
from sizewise.server.runner import ServerThread

MAX_MODEL_LEN = 4096
LONG_PROMPT = [3 + i % 300 for i in range(1500)]  # 94 of a replica's 1024 KV blocks: 9% > KV_RESOLUTION


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray")
    build_checkpoint(root / "llama", "llama")
    cfg = json.loads((root / "llama" / "config.json").read_text())
    cfg["max_position_embeddings"] = MAX_MODEL_LEN  # room for a long prompt and a long decode
    (root / "llama" / "config.json").write_text(json.dumps(cfg))
    path = root / "deployment.yaml"
    path.write_text(yaml.safe_dump({
        "device": "cpu", "models": [{"name": "tiny", "tier": "large", "path": "llama"}],
        "engine": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 4, "block_size": 16,
                   "num_speculative_tokens": 0},
        "policy": {"router": "static"},
    }))
    return path


@pytest.fixture(scope="module")
def proxy(config_path):
    """The URL of Ray Serve's HTTP proxy in front of two sizewise replicas."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(config_path), "replicas": 2, "num_cpus": 0.5}),
                  name="sizewise", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def plain(config_path):
    """The same deployment on a plain sizewise server in this process: the reference."""
    deployment = Deployment.load(DeploymentConfig.from_yaml(config_path), echo_plan=False)
    try:
        with ServerThread(create_app(deployment)) as url:
            yield url
    finally:
        deployment.shutdown()


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _served_by(url: str, prompt, max_tokens: int = 4) -> str:
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER]


class _Stream:
    """A streamed completion held open on a background thread; `replica` once its headers came."""

    def __init__(self, url: str, prompt, max_tokens: int) -> None:
        self.replica: str | None = None
        self.chunks = 0
        self.finished = False
        self.stop = threading.Event()
        self.headers = threading.Event()
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()
        assert self.headers.wait(60), "no response headers within 60 s"

    def _run(self, url: str, body: dict) -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            self.replica = r.headers.get(REPLICA_HEADER)
            self.headers.set()
            for line in r.iter_lines():
                if self.stop.is_set():
                    return  # closing the connection aborts the request
                self.chunks += line.startswith("data: {")
                self.finished = line == "data: [DONE]"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_completions_through_the_proxy_equal_a_plain_server(proxy, plain):
    ray_client, plain_client = _openai(proxy), _openai(plain)
    for prompt in ("The quick brown fox", "def add(a, b):", [5, 17, 42, 99]):
        got = ray_client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        want = plain_client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.usage == want.usage, prompt
    chat = ray_client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == plain_client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0, messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
    body = {"model": "tiny", "prompt": "The quick", "params": {"max_tokens": 4, "temperature": 0}}
    native = httpx.post(proxy + "/generate", json=body, timeout=60)
    assert native.status_code == 200, native.text
    assert native.json()["token_ids"] == httpx.post(plain + "/generate", json=body, timeout=60).json()["token_ids"]
    metrics = httpx.get(proxy + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "sizewise_" in metrics.text
    assert httpx.get(proxy + "/health", timeout=30).json() == {"status": "ok"}


def test_pressure_orders_kv_first_then_queue():
    empty = {"kv_cache_usage": 0.0, "num_waiting": 0, "num_running": 0}
    assert pressure({**empty, "kv_cache_usage": 0.5}) > pressure({**empty, "num_waiting": 9, "num_running": 9})
    assert pressure({**empty, "num_waiting": 1}) > pressure({**empty, "num_running": 5})
    assert pressure({**empty, "kv_cache_usage": KV_RESOLUTION / 2}) == pressure(empty), "within one step: equal"
    assert pressure(empty, in_flight=2) > pressure({**empty, "num_running": 1}), "sent but not yet reported"
    assert pressure({}) == pressure(empty), "a replica that has not reported yet counts as empty"


def test_router_sends_work_away_from_the_replica_holding_more_kv(proxy):
    # Two replicas with one running request each: equal queues (Ray's default router would pick
    # either), but one holds a 1500-token prompt's KV and the other a 4-token one's.
    long = _Stream(proxy, LONG_PROMPT, MAX_MODEL_LEN - len(LONG_PROMPT) - 1)
    short = None
    try:
        time.sleep(1.5)  # the router's queue cache and the stats see `long` before `short` goes
        short = _Stream(proxy, [5, 6, 7, 8], MAX_MODEL_LEN - 8)
        assert short.replica != long.replica, "the second request went to the replica already busy"
        time.sleep(3 * 1.0)  # a few routing-stats reports (every STATS_PERIOD_S = 1 s) from both
        chosen = [_served_by(proxy, [9, 10, 11]) for _ in range(4)]
        assert not long.finished and not short.finished, "the loads ended before the check; lengthen them"
        assert chosen == [short.replica] * 4, (chosen, long.replica, short.replica)
    finally:
        long.close()
        if short is not None:
            short.close()


def test_a_dead_engine_fails_its_health_check_and_traffic_moves_on(proxy):
    def _stop_engine(replica_actor) -> None:  # nested: pickled by value, this module is not on the worker's path
        # Runs inside the replica's Ray actor: stop the sizewise engine worker as if it had crashed.
        replica_actor._replica_impl._user_callable_wrapper._callable.deployment.engine.shutdown()

    victim = _served_by(proxy, [1, 2, 3])
    actor = ray.get_actor(victim, namespace="serve")
    ray.get(actor.__ray_call__.remote(_stop_engine), timeout=30)
    with pytest.raises(ray.exceptions.RayTaskError, match="engine worker is not running"):
        ray.get(actor.check_health.remote(), timeout=30)
    deadline = time.monotonic() + 60  # Serve health-checks every 2 s (health_check_period_s)
    while serve.status().applications["sizewise"].deployments["sizewise"].status == "HEALTHY":
        assert time.monotonic() < deadline, "Serve did not notice the dead engine within 60 s"
        time.sleep(0.5)
    served = [_served_by(proxy, [4, 5, 6]) for _ in range(6)]  # each a 200 (asserted inside)
    assert victim not in served, served


def test_serve_ray_refuses_what_it_cannot_do(config_path, capsys):
    from sizewise.cli import main

    assert main(["serve", "--ray", "--model", str(config_path.parent / "llama")]) == 2
    assert "models by directory are not supported" in capsys.readouterr().err
    assert main(["serve", "--ray", "--replicas", "0", "--config", str(config_path)]) == 2
    assert "--replicas 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="replicas=0"):
        build_app({"config": str(config_path), "replicas": 0})
