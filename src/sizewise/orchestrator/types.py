"""What flows between the gateway and the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RoutingHints:
    """The request's `sizewise` object (validated by the server's pydantic model)."""

    strategy: str = "auto"
    max_latency_ms: float | None = None


@dataclass(slots=True)
class Decision:
    """Which resident model answers a request, how it is decoded, and why."""

    model: str  # the engine (resident model) name
    tier: str  # small | medium | large
    strategy: str  # plain | pld | draft
    reason: str  # e.g. "pinned", "probe:easy", "kv_pressure:down"
    probe: dict | None = None  # probe scores and time, when a probe ran
    extra: dict = field(default_factory=dict)
    explain: dict | None = None  # the objective: lambda, per-tier predicted loss / latency / cost


    def to_json(self) -> dict:
        d = {"model": self.model, "tier": self.tier, "strategy": self.strategy, "reason": self.reason}
        if self.explain is not None:
            d["explain"] = self.explain
        if self.probe is not None:
            d["probe"] = self.probe
        return d
