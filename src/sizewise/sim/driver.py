"""The discrete-event driver: the real serving stack on virtual time.

What runs unchanged: `Deployment.submit` (routing, validation, queueing), the router, policy and
telemetry, `AsyncEngine`'s worker loop (`_run`: the round-robin / fair discipline and the probe
engine's priority), every `EngineCore` with its `Scheduler` and `BlockManager`. What is replaced:
the model forward (`SimRunner`: the step-cost model advances a `VirtualClock`), the worker thread
(`SimEngine` runs `_run` on the caller's thread, and its idle wait is where virtual time jumps to
the next event) and the HTTP clients (coroutines on one event loop that `submit` at their arrival
time and record when each token arrives).

Events: arrivals, client aborts, deadlines (a client that gives up: the request is aborted and
counted as missed) and engine faults (from a time on, every step of an engine raises). The event
loop runs to quiescence between any two engine steps (everything the server's event loop would do
while the worker steps is done by then), so a run is deterministic for a seed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..clock import VirtualClock
from ..engine.async_engine import AsyncEngine
from ..engine.config import EngineConfig
from ..engine.core import EngineCore, load_tokenizer
from ..models import ModelConfig
from ..orchestrator.deployment import Deployment, DeploymentConfig, StaticRouter
from ..orchestrator.planner import plan_memory
from ..orchestrator.policy import TIER_ORDER
from ..orchestrator.types import Decision, Prompt, RoutingHints
from ..sampling_params import SamplingParams
from .hardware import SimPlatform
from .runner import SimDevice, SimRunner

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


@dataclass(slots=True)
class WorkItem:
    prompt: list[int]
    ref: list[int] | None = None  # the continuation the simulated runner generates
    difficulty: float | None = None  # the probe model's mean prompt NLL (what the probe measures)
    nll: dict[str, float] = field(default_factory=dict)  # tier -> mean NLL of ref (quality)


@dataclass(slots=True)
class SimRecord:
    """One simulated client request (times in virtual seconds from the run's start)."""

    index: int
    arrival: float
    ttft: float | None = None
    latency: float | None = None
    tier: str | None = None
    reason: str | None = None
    output_tokens: int = 0
    probe_ms: float | None = None
    signal: bool = False  # the probe measured the host-side quality signal (surprisal) for it
    predicted_ms: float | None = None
    explain: dict = field(default_factory=dict)
    error: str | None = None  # refused, failed by the engine, aborted or past its deadline
    sub: object = None
    max_tokens: int | None = None  # None: the run's

    @property
    def done(self) -> bool:
        return self.latency is not None


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """`asyncio.to_thread` (the probe offloads long prompts) done inline: no thread, no wall time."""

    def submit(self, fn, /, *args, **kwargs):
        f: concurrent.futures.Future = concurrent.futures.Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            f.set_exception(e)
        return f


class _Idle:
    """Stands in for the worker's wake-up event: its wait (all engines idle) is where the
    simulation jumps to the next event, or ends the run when none is left."""

    def __init__(self, sim: "Simulation") -> None:
        self.sim = sim

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        self.sim._idle()
        return True


class SimEngine(AsyncEngine):
    """`AsyncEngine` without its thread: `run()` executes the real worker loop (`_run`) on virtual time."""

    def __init__(self, cores: dict[str, EngineCore], sim: "Simulation") -> None:
        super().__init__(cores, clock=sim.clock, start=False)
        self._sim = sim
        self._wake = _Idle(sim)

    def _drain_inbox(self) -> None:
        self._sim._due()  # events up to now happen, and the event loop runs until it waits
        while not self._inbox.empty():
            super()._drain_inbox()
            self._sim._settle()

    def _step_core(self, name: str) -> float:
        dt = super()._step_core(name)
        self.clock.advance(self._sim.device.cost.gap())  # the host's time between steps (not the step's)
        return dt

    def run(self) -> None:
        self._stop = False
        self._closed = False
        self._run()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True

    @property
    def alive(self) -> bool:
        return self._dead is None


class SimSpec:
    """What to simulate: a deployment config, the device's cost model and platform, model shapes."""

    def __init__(self, config: DeploymentConfig, cost, platform: SimPlatform, shapes: dict[str, Path] | None = None,
                 tokenizer=None) -> None:
        self.config = copy.deepcopy(config)
        # The simulated runner decodes plain (no speculation): every request routes with strategy plain.
        self.config.engine.num_speculative_tokens = 0
        self.cost = cost
        self.platform = platform
        # The tokenizer comes from the config's own first model (the workload's); a shape has none.
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.config.models[0].path)
        for m in self.config.models:  # a tier given a shape is named after it
            if shapes and m.tier in shapes:
                m.name = Path(shapes[m.tier]).name
        self.model_dirs = {m.name: Path(shapes[m.tier]) if shapes and m.tier in shapes else Path(m.path)
                           for m in self.config.models}
        self.model_configs = {n: ModelConfig.from_pretrained(d) for n, d in self.model_dirs.items()}
        self.plan = plan_memory(self.config, platform, self.model_configs)

    def plan_tiers(self) -> list[str]:
        """The resident tiers, smallest first."""
        return sorted((m.tier for m in self.config.models), key=TIER_ORDER.index)


class Simulation:
    """One run of the real stack on a fresh deployment, driven by events on virtual time."""

    def __init__(self, spec: SimSpec, items: list[WorkItem], seed: int = 0) -> None:
        self.spec = spec
        self.items = items
        self.clock = VirtualClock()
        cfg = spec.config
        spec.cost.reseed(seed)
        self.device = SimDevice(self.clock, spec.cost, {m.name: m.tier for m in cfg.models})
        for it in items:
            key = tuple(it.prompt)
            if it.ref is not None:
                self.device.references[key] = it.ref
            if it.difficulty is not None:
                self.device.difficulty[key] = it.difficulty
        cores = {}
        for m in cfg.models:
            ecfg = EngineConfig(dtype=m.dtype or cfg.dtype, device="cpu", kv_cache_bytes=spec.plan.model(m.name).kv_bytes,
                                **cfg.engine.model_dump())
            cores[m.name] = EngineCore(
                spec.model_dirs[m.name], ecfg, platform=spec.platform, tokenizer=spec.tokenizer, name=m.name,
                clock=self.clock, runner_factory=lambda core, n: SimRunner(self.device, core, n))
        self.engine = SimEngine(cores, self)
        self.deployment = Deployment(cfg, cores, plan=spec.plan, engine=self.engine)
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(_InlineExecutor(max_workers=1))
        self.events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.records: list[SimRecord] = []
        self.hints = RoutingHints(strategy="plain")

    def close(self) -> None:
        self.loop.close()

    # ----- events --------------------------------------------------------------------------
    def at(self, t: float, kind: str, arg=None) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, arg))

    def _due(self) -> None:
        while self.events and self.events[0][0] <= self.clock.now():
            t, _, kind, arg = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(arg, t)
        self._settle()

    def _idle(self) -> None:
        if self.events:
            self.clock.advance_to(self.events[0][0])
        else:
            self.engine._stop = True

    def _settle(self) -> None:
        """Run the event loop until every task waits (on the engine, or for an event)."""
        if self.loop._ready:  # noqa: SLF001 - the loop's own run queue (checked, not changed)
            self.loop.run_until_complete(_quiesce(self.loop))

    def _on_arrive(self, rec: SimRecord, t: float) -> None:
        self._tasks.append(self.loop.create_task(self._client(rec)))

    def _on_abort(self, rec: SimRecord, t: float) -> None:
        if not rec.done:
            if rec.sub is not None:
                rec.sub.abort()
            self._finish(rec, "aborted by the client", at=t)

    _on_deadline = None  # set in run(): abort with a reason naming the deadline

    def _on_fault(self, name: str, t: float) -> None:
        self.device.dead[name] = t

    def _finish(self, rec: SimRecord, error: str | None = None, at: float | None = None) -> None:
        """`at`: when the client gave up (an abort or a deadline: the engine frees the request at its
        next step boundary, the client stopped waiting at `at`)."""
        if not rec.done:
            rec.latency = (self.clock.now() if at is None else at) - rec.arrival
            rec.error = error
            if rec.sub is not None:  # where it ended: a plan move rewrites the decision
                rec.tier = rec.sub.decision.tier

    # ----- clients -------------------------------------------------------------------------
    async def _client(self, rec: SimRecord) -> None:
        item = self.items[rec.index]
        params = SamplingParams(max_tokens=rec.max_tokens or self.max_tokens, temperature=0.0, ignore_eos=True)

        def sink(_i: int, out) -> None:
            if rec.done:
                return
            if isinstance(out, BaseException):
                self._finish(rec, f"{type(out).__name__}: {out}")
                return
            n = sum(len(o.token_ids) for o in out.outputs)
            if n and rec.ttft is None:
                rec.ttft = self.clock.now() - rec.arrival
            rec.output_tokens += n
            if out.finished:
                self._finish(rec, None if all(o.finish_reason in ("length", "stop") for o in out.outputs)
                             or not out.outputs else "aborted")

        try:
            subs = await self.deployment.submit(f"sim-{rec.index}", [Prompt(list(item.prompt))], params, "auto",
                                                self.hints, sink=sink)
        except Exception as e:  # noqa: BLE001 - a refusal is the request's outcome
            self._finish(rec, f"{type(e).__name__}: {e}")
            return
        sub = subs[0]
        rec.sub = sub
        d = sub.decision
        rec.tier, rec.reason = d.tier, d.reason
        rec.probe_ms = (d.probe or {}).get("ms")
        rec.signal = (d.probe or {}).get("surprisal") is not None
        rec.explain = d.explain or {}
        rec.predicted_ms = rec.explain.get("tiers", {}).get(d.tier, {}).get("latency_ms")
        if rec.done:  # aborted or past its deadline while it was being routed
            sub.abort()

    # ----- a run -----------------------------------------------------------------------------
    def run(self, router, arrivals: list[float], max_tokens: int, warmup: int = 8, timeout_s: float | None = None,
            aborts: dict[int, float] | None = None, faults: dict[str, float] | None = None) -> list[SimRecord]:
        """Serve item i at arrivals[i] (seconds) with `router`; returns one record per item.
        First, like the real benchmark (whose warm-up cells share one deployment), `warmup` requests
        on each tier give the telemetry its first steps, then a few on every tier at once its
        interleaved steps; then the prefix caches and the learned latency are reset and the run
        starts. The warm-up's lengths are staggered (request i of k stops after (i+1)/k of
        max_tokens), so each tier's decode steps see batch sizes 1..k and its cost line has a slope;
        from one batch size alone the telemetry must guess the split of fixed and per-row cost, and
        on an accelerator (a step mostly weight stream) that guess prices a row ~100x too high."""
        self.max_tokens = max_tokens
        dep = self.deployment
        if warmup:
            k = min(warmup, len(self.items))
            for tier in dep.tier_to_model:
                dep.router = StaticRouter(tier)
                for i in range(k):
                    self.at(self.clock.now(), "arrive",
                            SimRecord(i, self.clock.now(), max_tokens=max(1, max_tokens * (i + 1) // k)))
                self.engine.run()
            tiers = list(dep.tier_to_model)
            dep.router = _DealRouter([tiers[i % len(tiers)] for i in range(len(tiers) * max(k // 2, 1))])
            for i in range(len(dep.router.deck)):
                self.at(self.clock.now(), "arrive", SimRecord(i % len(self.items), self.clock.now()))
            self.engine.run()
            self.clock.advance(1.0)
            reset_prefix_caches(dep)
            dep.telemetry.forget_latency()
        dep.router = router
        t0 = self.clock.now()
        self.records = [SimRecord(i, t0 + a) for i, a in enumerate(arrivals)]

        def deadline(rec: SimRecord, t: float) -> None:
            if not rec.done:
                if rec.sub is not None:
                    rec.sub.abort()
                self._finish(rec, f"deadline: no answer within {timeout_s:g} s", at=t)

        self._on_deadline = deadline
        for rec in self.records:
            self.at(rec.arrival, "arrive", rec)
            if timeout_s is not None:
                self.at(rec.arrival + timeout_s, "deadline", rec)
        for i, t in (aborts or {}).items():
            self.at(t0 + t, "abort", self.records[i])
        for name, t in (faults or {}).items():
            self.at(t0 + t, "fault", name)
        self.engine.run()
        self._settle()
        for rec in self.records:  # engines idle, no event left: whatever waits now would wait for ever
            if not rec.done:
                self._finish(rec, "hung: no engine will ever answer it")
            rec.arrival -= t0
        return self.records


class _DealRouter:
    """The warm-up's interleaved requests: tiers dealt in a fixed order."""

    def __init__(self, deck: list[str]) -> None:
        self.deck = list(deck)
        self.decisions: dict = {}

    async def route(self, deployment, prompt_token_ids, params, requested, hints) -> Decision:
        tier = self.deck.pop()
        return Decision(model=deployment.tier_to_model[tier], tier=tier, strategy="plain", reason="warmup")


async def _quiesce(loop: asyncio.AbstractEventLoop) -> None:
    # When this task runs with nothing else ready, every other callback of the iteration has run and
    # none scheduled another: the loop would now block.
    while True:
        await asyncio.sleep(0)
        if not loop._ready:  # noqa: SLF001
            return


def reset_prefix_caches(dep: Deployment) -> None:
    """Forget every cached prefix (engines idle): no run may reuse an earlier run's prefill."""
    for core in dep.cores.values():
        if core.has_unfinished_requests():
            raise RuntimeError(f"{core.name} is still busy; cannot reset its prefix cache")
        bm = core.block_manager
        bm.hash_to_block.clear()
        for blk in bm.blocks:
            if blk.ref_count == 0:
                blk.hash, blk.token_ids = -1, ()


def shapes_dir(name: str) -> Path:
    """A shipped model shape (config.json only): qwen2.5-0.5b/1.5b/7b, llama-3.2-1b/3b, llama-3.1-8b;
    or a directory holding a config.json."""
    p = SHAPES_DIR / name
    if (p / "config.json").is_file():
        return p
    q = Path(name)
    if (q / "config.json").is_file():
        return q
    known = ", ".join(sorted(d.name for d in SHAPES_DIR.iterdir() if d.is_dir()))
    raise ValueError(f"unknown model shape {name!r}: give one of {known}, or a directory with a config.json")
