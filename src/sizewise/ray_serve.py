"""sizewise on Ray Serve: each replica is one whole sizewise deployment (all its co-resident tiers
on one device) serving the same FastAPI app (OpenAI /v1/*, /generate, /metrics) behind Ray Serve's
HTTP proxy, and `KVPressureRouter` picks the replica by what each replica reports: least KV-cache
pressure first, then the shortest queue (Ray's default router compares queue lengths of two random
replicas and knows nothing of KV).

    sizewise serve --ray --replicas 2 --config configs/demo.yaml
    # or: serve run sizewise.ray_serve:build_app config=configs/demo.yaml replicas=2

Needs the optional extra (`pip install 'sizewise[ray]'`); nothing else in sizewise imports this
module, so the package works without Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from .orchestrator.deployment import Deployment, DeploymentConfig
from .orchestrator.tiers import TIER_ORDER

log = logging.getLogger(__name__)

# The replicas report every second; a stat is dropped after 5 s without an answer (a stuck replica).
STATS_PERIOD_S = 1.0
STATS_TIMEOUT_S = 5.0
# KV usages this close count as equal, so the queue decides between replicas that are both nearly
# empty (usage is a fraction of blocks: one request's blocks must not outrank a queue of ten).
KV_RESOLUTION = 0.05
REPLICA_HEADER = "x-sizewise-replica"


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """What one replica reports to the router (`record_routing_stats`)."""

    kv_cache_usage: float  # 0-1: KV blocks in use over all resident tiers' blocks
    num_waiting: int
    num_running: int
    bandwidth_utilization: float  # achieved / peak memory bandwidth (0 before the first step)
    resident_tiers: tuple[str, ...]

    @classmethod
    def of(cls, deployment: Deployment) -> "ReplicaLoad":
        stats = deployment.engine.stats()
        total = sum(s.kv_blocks_total for s in stats.values())
        snap = deployment.telemetry.snapshot()
        return cls(
            kv_cache_usage=sum(s.kv_blocks_used for s in stats.values()) / total if total else 0.0,
            num_waiting=sum(s.num_waiting for s in stats.values()),
            num_running=sum(s.num_running for s in stats.values()),
            bandwidth_utilization=snap.bandwidth_utilization,
            resident_tiers=tuple(sorted(deployment.tier_to_model, key=TIER_ORDER.index)),
        )

    def as_stats(self) -> dict[str, Any]:
        return {"kv_cache_usage": self.kv_cache_usage, "num_waiting": self.num_waiting,
                "num_running": self.num_running, "bandwidth_utilization": self.bandwidth_utilization,
                "resident_tiers": list(self.resident_tiers)}


def pressure(stats: dict[str, Any], in_flight: int = 0) -> tuple[int, int, int]:
    """The router's sort key for a replica's reported stats (smaller is better): KV usage in steps
    of KV_RESOLUTION, then waiting requests, then running ones. `in_flight` (requests this router
    sent and has not seen finish) stands in for a running count the last report predates."""
    kv = float(stats.get("kv_cache_usage", 0.0))
    running = max(int(stats.get("num_running", 0)), in_flight)
    return int(kv / KV_RESOLUTION), int(stats.get("num_waiting", 0)), running


class KVPressureRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: every candidate replica ranked by `pressure()` of its last
    routing stats, each in its own rank, so Serve tries the least loaded first and falls back to
    the next when a replica refuses (at its max_ongoing_requests)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        def key(r: RunningReplica) -> tuple[int, int, int]:
            in_flight = self.replica_queue_len_cache.get(r.replica_id) or 0
            return pressure(r.routing_stats or {}, in_flight)

        return [[r] for r in sorted(candidate_replicas, key=key)]


@serve.ingress()  # the app is built per replica, after __init__ has loaded the models
class SizewiseReplica:
    """One replica: the whole deployment of `config_path`, loaded in the replica's process."""

    def __init__(self, config_path: str, device: str | None = None, proxy_host: str = "127.0.0.1") -> None:
        cfg = DeploymentConfig.from_yaml(config_path)
        if device:
            cfg.device = device
        # The app refuses non-loopback Host headers when it believes it listens on loopback: what it
        # listens on here is Ray's HTTP proxy.
        cfg.server.host = proxy_host
        self.deployment = Deployment.load(cfg, echo_plan=False)

    def __serve_build_asgi_app__(self):
        from .server import create_app

        app = create_app(self.deployment)
        app.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_id.to_full_id_str())
        return app

    def check_health(self) -> None:
        """Serve restarts a replica whose check raises: its engine worker died."""
        if not self.deployment.engine.alive:
            raise RuntimeError("the sizewise engine worker is not running")

    def record_routing_stats(self) -> dict[str, Any]:
        return ReplicaLoad.of(self.deployment).as_stats()

    def __del__(self) -> None:
        deployment = getattr(self, "deployment", None)
        if deployment is not None:
            deployment.shutdown()


class _ReplicaHeader:
    """Names the replica that answered in each response (`x-sizewise-replica`, Ray's actor name of
    the replica: `ray.get_actor(name, namespace="serve")`), to trace a request to its replica."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application (`serve run sizewise.ray_serve:build_app config=PATH replicas=N`).

    args: config (deployment YAML; every replica reads it, so it must be on a path each node sees),
    replicas (default 1), num_cpus / num_gpus per replica (default 1 / 0), device, proxy_host.
    """
    config = Path(args["config"]).resolve()
    DeploymentConfig.from_yaml(config)  # a bad config fails here, not in every replica
    replicas = int(args.get("replicas", 1))
    if replicas < 1:
        raise ValueError(f"replicas={replicas}: at least 1")
    actor_options = {"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))}
    deployment = serve.deployment(
        SizewiseReplica,
        name="sizewise",
        num_replicas=replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=int(args.get("max_ongoing_requests", 256)),
        health_check_period_s=float(args.get("health_check_period_s", 2.0)),
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(
            request_router_class=KVPressureRouter,
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=STATS_TIMEOUT_S,
        ),
    )
    return deployment.bind(str(config), args.get("device"), args.get("proxy_host", "127.0.0.1"))
