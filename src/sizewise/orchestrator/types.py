"""What flows between the gateway and the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass, field

from .explain import summary


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


    def to_json(self, brief: bool = False) -> dict:
        """`brief`: where it went and why, without the probe and the objective (a stream's chunks
        repeat it; the whole object goes out once)."""
        d = {"model": self.model, "tier": self.tier, "strategy": self.strategy, "reason": self.reason}
        if brief:
            return d
        d["summary"] = summary(self.tier, self.reason, self.explain, self.probe)
        if self.explain is not None:
            d["explain"] = self.explain
        if self.probe is not None:
            d["probe"] = self.probe
        return d


@dataclass(slots=True)
class Prompt:
    """One prompt of a request, tokenized once by the server before routing."""

    ids: list[int]
    text: str | None = None  # as the client sent it, when it was text (echo returns it)


class Submission:
    """One admitted prompt of `Deployment.submit`: where it went and why, and its handle.

    Its deltas (RequestOutputs; an exception if the engine fails it) go to the sink given to
    `submit`, or, without one, are iterated here; iteration ends after the finished delta."""

    __slots__ = ("index", "request_id", "decision", "_stream")

    def __init__(self, index: int, request_id: str, decision: Decision, stream) -> None:
        self.index = index  # the prompt's position in the submitted list
        self.request_id = request_id
        self.decision = decision
        self._stream = stream

    def abort(self) -> None:
        """Free its KV blocks at the engine's next step; no-op once finished."""
        self._stream.abort()

    def __aiter__(self):
        return self._stream.__aiter__()


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What a resident model is (fixed once loaded)."""

    name: str
    tier: str
    path: str
    family: str
    num_params: int
    device: str
    dtype: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int  # KV-cache blocks
    kv_cache_bytes: int
    strategies: tuple[str, ...]  # the decodings it can run: plain, pld (speculation on), draft (a draft attached)


@dataclass(slots=True)
class ModelStats:
    """One resident model, live."""

    name: str
    tier: str
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int  # running total
    # running totals per proposer the model can run ("pld", "draft"); absent where it never can
    spec_draft_tokens: dict[str, int]
    spec_accepted_tokens: dict[str, int]
    achieved_bandwidth: float  # bytes / s while stepping (0 before any step)
    bandwidth_utilization: float | None  # achieved / device peak; None without a peak
    # running totals of this model's own work (steps, and drafting for another model)
    device_seconds_total: float = 0.0
    device_bytes_total: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(slots=True)
class DeploymentStats:
    models: dict[str, ModelStats]
    peak_bandwidth: float | None = None
    device_memory_used_bytes: int | None = None
    busy_fraction: float | None = None  # share of the last 2 s the device spent stepping (telemetry)
    load_utilization: float | None = None  # share of it spent on per-token work (the plan's utilisation)

    @property
    def num_running(self) -> int:
        return sum(m.num_running for m in self.models.values())

    @property
    def num_waiting(self) -> int:
        return sum(m.num_waiting for m in self.models.values())

    @property
    def kv_usage(self) -> float:
        """The fullest tier's: a request sent to this deployment may land on any tier, and the
        fullest one is where it would wait or be preempted first."""
        return max((m.kv_usage for m in self.models.values()), default=0.0)
