"""A deployment: the config file (pydantic, at the edge) and the running set of engines.

`Deployment` is all the server talks to, through a narrow API: `submit` (route, validate once,
queue; deltas stream back), `abort` (on the returned submissions), `describe` and `stats`, the
tokenizer and context lengths, `alive` and `shutdown`. The server knows nothing about KV blocks
or engines; the engines know nothing about HTTP.

One worker thread steps all engines (`AsyncEngine`). Its discipline is `policy.discipline`, by
default `fair` (equal device-time shares between busy engines), set by the adaptive router; with
the static router the worker keeps AsyncEngine's own default, `round_robin` (one step per busy
engine per turn).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
from collections.abc import Callable
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.async_engine import AsyncEngine
from ..engine.config import EngineConfig
from ..engine.core import EngineCore
from ..errors import InvalidRequestError, UnknownModelError
from ..models import CheckpointError, ModelConfig
from ..models.loader import checkpoint_files, tokenizer_files
from ..outputs import RequestOutput
from ..platform import Platform, get_platform
from ..sampling_params import SamplingParams
from .config import PolicyConfig
from .planner import MemoryPlan, plan_memory
from .router import AdaptiveRouter, _accepted_strategies
from .telemetry import Telemetry
from .tiers import TIER_ORDER
from .types import Decision, DeploymentStats, ModelInfo, ModelStats, Prompt, RoutingHints, Submission

log = logging.getLogger(__name__)
_MOVABLE_TRACKED = 4096  # auto requests remembered for a move (finished ones age out)

# Where a submission's deltas go: called on the submitting event loop with the prompt's index and
# a RequestOutput delta (or the exception that failed it).
Sink = Callable[[int, "RequestOutput | BaseException"], None]

class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    tier: Literal[TIER_ORDER]  # type: ignore[valid-type]
    path: str
    dtype: str | None = None
    kv_share: float = Field(default=1.0, gt=0, le=1)


class EngineSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_model_len: int | None = Field(default=None, ge=2)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    block_size: int | None = Field(default=None, ge=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_waiting: int = Field(default=1024, ge=1)
    # speculative decoding (engine/spec/): k fixed per step, 0 turns it off
    num_speculative_tokens: int = Field(default=4, ge=0, le=15)
    prompt_lookup_max: int = Field(default=3, ge=1)
    prompt_lookup_min: int = Field(default=2, ge=1)
    spec_batching: Literal["auto", "split", "padded"] = "auto"


class ServerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    metrics_require_auth: bool = False
    request_timeout_s: float = Field(default=600.0, gt=0)
    # deltas one request may have waiting for a slow client before it is aborted (0: unbounded)
    max_queued_deltas: int = Field(default=0, ge=0)
    # A chat template inside a request's chat_template_kwargs is code the server would run: refused
    # unless the operator trusts every client (as vLLM after CVE-2025-61620).
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = Field(default=5.0, gt=0)  # a template rendering longer is a 400
    # Reliability (server/connections.py, server/serving.py): a request that cannot start within
    # max_queue_delay_s (or its own sizewise.max_latency_ms) is refused with a 503 and Retry-After
    # (0: never); a request must arrive whole within read_timeout_s of its first byte; a connection
    # idle for keep_alive_s is closed; connections beyond max_connections are refused.
    max_queue_delay_s: float = Field(default=30.0, ge=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=1024, ge=1)


class DeploymentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = "auto"
    dtype: str = "auto"
    memory_fraction: float = Field(default=0.5, gt=0, le=1)
    # All models' KV caches together, bytes (split by kv_share); replaces what memory_fraction leaves.
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    models: list[ModelEntry] = Field(min_length=1)
    engine: EngineSection = Field(default_factory=EngineSection)
    server: ServerSection = Field(default_factory=ServerSection)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)  # the orchestrator's router and policy
    default_tier: Literal[TIER_ORDER] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_model_per_name_and_tier(self) -> "DeploymentConfig":
        """A request's `model` resolves to exactly one resident model: names and tiers are unique,
        and no name shadows `auto` or another model's tier alias. What the policy names is resident."""
        seen: dict[str, str] = {}
        by_tier: dict[str, str] = {}
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"models: the name {m.name!r} is used more than once (names must be unique)")
            seen[m.name] = m.tier
            if m.tier in by_tier:
                raise ValueError(f"models: tier {m.tier!r} is given to both {by_tier[m.tier]!r} and {m.name!r} "
                                 f"(one model per tier)")
            by_tier[m.tier] = m.name
            if m.name == "auto" or (m.name in TIER_ORDER and m.name != m.tier):
                raise ValueError(f"models: the name {m.name!r} of the {m.tier} model is reserved "
                                 f"('auto' and the other tiers' aliases): pick another name")
        if self.default_tier is not None and self.default_tier not in by_tier:
            raise ValueError(f"default_tier {self.default_tier!r} is not a resident tier; "
                             f"resident: {', '.join(by_tier)}")
        probe = self.policy.probe_model
        if probe is not None and probe not in seen and probe not in by_tier:
            raise ValueError(f"policy.probe_model {probe!r} is not a resident model or tier; "
                             f"resident: {', '.join([*by_tier, *seen])}")
        return self

    def policy_warnings(self) -> list[str]:
        """Policy settings that name tiers this deployment does not use (kept, but they do nothing)."""
        q = self.policy.quality
        if q is None:
            return []
        tiers = [t for t in TIER_ORDER if t in {m.tier for m in self.models}]
        out = []
        for t in q.tiers:
            if t not in tiers:
                out.append(f"policy.quality.tiers.{t}: this deployment has no {t} tier (resident: "
                           f"{', '.join(tiers)}); the fit is ignored")
            elif t == tiers[-1]:
                out.append(f"policy.quality.tiers.{t}: {t} is this deployment's top tier, whose loss is 0 by "
                           f"definition; the fit is ignored")
        missing = [t for t in tiers[:-1] if t not in q.tiers]
        if missing:
            out.append(f"policy.quality has no fit for {', '.join(missing)}: a fixed prior gap stands in; run "
                       f"`sizewise calibrate` for this deployment")
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DeploymentConfig":
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        cfg = cls.model_validate(raw)
        for m in cfg.models:  # paths are relative to the config file
            p = Path(m.path)
            if not p.is_absolute():
                m.path = str((path.parent / p).resolve())
        ts = cfg.policy.token_stats
        if ts and not Path(ts).is_absolute():
            cfg.policy.token_stats = str((path.parent / ts).resolve())
        return cfg

    @classmethod
    def from_model_dirs(cls, dirs: list[str], names: list[str] | None = None, **kw) -> "DeploymentConfig":
        """`--model DIR ...`: tiers assigned by order (1 model: large; 2: small, large; 3: all);
        `names` (--served-model-name), one per directory, replace the directories' names."""
        tiers = {1: [TIER_ORDER[-1]], 2: [TIER_ORDER[0], TIER_ORDER[-1]], 3: list(TIER_ORDER)}.get(len(dirs))
        if tiers is None:
            raise ValueError(f"give 1 to 3 --model directories, got {len(dirs)}")
        if names:
            if len(names) != len(dirs):
                raise ValueError(f"give one --served-model-name per --model: {len(names)} names for {len(dirs)} "
                                 f"models")
        else:
            names = [Path(d).name or d for d in dirs]
            # Directories with one basename (a/model, b/model) would collide: tell them apart by tier.
            names = [f"{n}-{t}" if names.count(n) > 1 or (n in TIER_ORDER and n != t) or n == "auto" else n
                     for n, t in zip(names, tiers)]
        models = [ModelEntry(name=n, tier=t, path=str(Path(d).resolve())) for n, d, t in zip(names, dirs, tiers)]
        return cls(models=models, **kw)


def prompt_request_ids(request_id: str, n: int) -> list[str]:
    """The engine request id of each prompt of one submission (the API and the core must agree)."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def check_prompts(prompts: list[Prompt], longest: int) -> None:
    """What a submission is refused for before routing (an oversized prompt never reaches a probe):
    no prompt, an empty one, one that leaves no room in the longest context served."""
    if not prompts:
        raise InvalidRequestError("prompt is empty", param="prompt")
    for p in prompts:
        if not p.ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(p.ids) >= longest:
            raise InvalidRequestError(
                f"prompt has {len(p.ids)} tokens but the longest context length served here is {longest} "
                f"tokens (the prompt must leave room for at least one generated token)", param="prompt")


class Router(Protocol):
    async def route(
        self, deployment: "Deployment", prompt_token_ids: list[int], params: SamplingParams,
        requested: str, hints: RoutingHints,
    ) -> Decision: ...


class StaticRouter:
    """`auto` goes to one fixed tier; a tier alias or a model name pins it."""

    def __init__(self, default_tier: str) -> None:
        self.default_tier = default_tier
        self.decisions: Counter[tuple[str, str]] = Counter()  # (tier, reason) -> count

    async def route(self, deployment, prompt_token_ids, params, requested, hints) -> Decision:
        if requested == "auto":
            name = deployment.tier_to_model[self.default_tier]
            reason = "static"
        else:
            name = deployment.resolve(requested)
            reason = "pinned"
        strategy = "plain" if hints.strategy == "auto" else hints.strategy
        self.decisions[(deployment.model_to_tier[name], reason)] += 1
        return Decision(model=name, tier=deployment.model_to_tier[name], strategy=strategy, reason=reason)


def _attach_drafts(config: DeploymentConfig, cores: dict[str, EngineCore]) -> None:
    """Make `strategy: draft` servable: the cheapest resident tier drafts for the larger ones
    (it shares their tokenizer; engines with speculation off are skipped)."""
    ordered = sorted(config.models, key=lambda m: TIER_ORDER.index(m.tier))
    if len(ordered) < 2:
        return
    draft = cores[ordered[0].name]
    for m in ordered[1:]:
        core = cores[m.name]
        if core.spec is None:
            continue
        try:
            core.attach_draft(draft)
        except ValueError as e:
            log.warning("no draft model for %s: %s", m.name, e)


def _check_one_tokenizer(cores: dict[str, EngineCore]) -> None:
    """A prompt is tokenized once, before routing, and its ids go to whichever tier serves it:
    every resident model must read ids the same way, or answers are silently garbage."""
    names = list(cores)
    ref = cores[names[0]].tokenizer.get_vocab().items()
    for name in names[1:]:
        vocab = cores[name].tokenizer.get_vocab().items()
        if not (vocab <= ref or ref <= vocab):  # one may add a special token at a new id, no more
            raise ValueError(
                f"models {names[0]!r} and {name!r} have different tokenizers: the sizes of one deployment "
                f"must share one (a family: e.g. Qwen2.5-0.5B/7B-Instruct)")


class Deployment:
    """All tiers co-resident in one process on one device. Their EngineCores are driven by one
    AsyncEngine worker thread that steps every busy core round-robin (one batched step each per
    turn): the models share the device's memory bandwidth anyway, sequential steps make each
    step's time attributable to one model (telemetry), and the host cores are not oversubscribed.
    """

    def __init__(
        self, config: DeploymentConfig, cores: dict[str, EngineCore], router: Router | None = None,
        plan: MemoryPlan | None = None, engine: AsyncEngine | None = None,
    ) -> None:
        """`engine`: the AsyncEngine that drives `cores` (default: a new one with its worker thread;
        the virtual device, `sizewise.sim`, hands in one it steps on virtual time)."""
        _check_one_tokenizer(cores)
        for w in config.policy_warnings():
            log.warning("%s", w)
        self.config = config
        self.cores = cores
        self.plan = plan
        self.model_to_tier = {m.name: m.tier for m in config.models}
        self.tier_to_model = {m.tier: m.name for m in config.models}
        # Quality first: the largest resident tier, whatever order the config lists the models in.
        default = config.default_tier or max(self.tier_to_model, key=TIER_ORDER.index)
        if router is None and config.policy.router == "adaptive":
            router = AdaptiveRouter(config.policy.to_settings())
        self.router: Router = router or StaticRouter(default)
        pol = config.policy
        self.telemetry = Telemetry(
            cores, self.model_to_tier, ema_alpha=pol.ema_alpha,
            peak_bandwidth=pol.peak_bandwidth_gbps * 1e9 if pol.peak_bandwidth_gbps else None,
        )
        self.engine = engine if engine is not None else AsyncEngine(cores)
        self.telemetry.attach(self.engine)
        self._movable: OrderedDict[str, Decision] = OrderedDict()  # auto requests the plan may move
        self.engine.move_listeners.append(self._on_move)
        bind = getattr(self.router, "bind", None)
        if bind is not None:  # checks what the router names against the resident models, now
            try:
                bind(self)
            except BaseException:
                self.engine.shutdown()
                raise

    @staticmethod
    def check(config: DeploymentConfig, platform: Platform | None = None) -> MemoryPlan:
        """Everything that can be refused before a weight is read, in a blink: each model's
        config.json, weight and tokenizer files, the context length against what the model was
        built for, and the memory plan (MemoryPlanError names the model and the bytes short)."""
        model_configs = {}
        for m in config.models:
            where = f"model {m.name} ({m.tier})"
            path = Path(m.path)
            try:
                cfg = ModelConfig.from_pretrained(path)
                checkpoint_files(path)
                tokenizer_files(path)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
            n = config.engine.max_model_len
            if n is not None and n > cfg.max_position_embeddings:
                raise ValueError(
                    f"{where}: engine.max_model_len {n} (sizewise serve --max-model-len) is larger than its "
                    f"max_position_embeddings ({cfg.max_position_embeddings}): lower it, or leave it unset so "
                    f"that each model uses its own")
            model_configs[m.name] = cfg
        return plan_memory(config, platform or get_platform(config.device), model_configs)

    @classmethod
    def load(cls, config: DeploymentConfig, router: Router | None = None, echo_plan: bool = True,
             plan: MemoryPlan | None = None, detokenize: bool = True) -> "Deployment":
        """`check` the deployment (unless its `plan` is given: it was checked), print the plan, then
        load every model onto one shared platform with its planned KV budget. `detokenize=False`:
        deltas carry token ids only, no text, and stop strings are not checked (the engine-core
        process: its API process does both)."""
        platform = get_platform(config.device)
        if plan is None:
            plan = cls.check(config, platform)
            if echo_plan:
                print(plan.table(), file=sys.stderr, flush=True)
            else:
                log.info("%s", plan.table())
        cores = {}
        for m in config.models:
            ecfg = EngineConfig(
                dtype=m.dtype or config.dtype, device=config.device,
                kv_cache_bytes=plan.model(m.name).kv_bytes, detokenize=detokenize,
                **config.engine.model_dump(),
            )
            log.info("loading %s (%s) from %s", m.name, m.tier, m.path)
            cores[m.name] = EngineCore(m.path, ecfg, platform=platform, name=m.name)
        _attach_drafts(config, cores)
        return cls(config, cores, router, plan)

    def _refuse_self_draft(self, d: Decision) -> None:
        """`draft` on the cheapest tier: it is the draft model itself (`_attach_drafts`)."""
        tiers = sorted(self.tier_to_model, key=TIER_ORDER.index)
        if d.strategy != "draft" or len(tiers) < 2 or d.tier != tiers[0]:
            return
        larger = " or ".join(tiers[1:])
        raise InvalidRequestError(
            f"strategy 'draft': {d.model} is the {d.tier} tier, which is the draft model of this deployment (it "
            f"drafts for the larger tiers); ask for {larger} with strategy 'draft', or use 'pld' or 'plain' on "
            f"{d.tier}", param="strategy")

    def _on_move(self, request_id: str, src: str, dst: str, written: int = 0) -> None:
        """An `auto` request moved (the plan left its tier): its decision says where it runs now,
        and, if it had begun, that its first `after_tokens` tokens are the old tier's."""
        d = self._movable.get(request_id)
        if d is None:
            return
        moved = {"from": self.model_to_tier[src], "to": self.model_to_tier[dst], "after_tokens": written,
                 "why": (f"the capacity plan left its tier after it had written {written} tokens: those are "
                         f"{self.model_to_tier[src]}'s, the rest {self.model_to_tier[dst]}'s") if written else
                        "the capacity plan left its tier before it was prefilled"}
        d.model, d.tier = dst, self.model_to_tier[dst]
        if d.explain is not None:
            d.explain["moved"] = moved
        router = self.router
        if hasattr(router, "moved"):
            router.moved += 1

    def resolve(self, requested: str) -> str:
        """A tier alias or a model name -> the resident model's name."""
        if requested in self.cores:
            return requested
        if requested in self.tier_to_model:
            return self.tier_to_model[requested]
        raise UnknownModelError(requested, ["auto", *self.tier_to_model, *self.cores])

    def tokenizer(self, model: str | None = None):
        return self.cores[self._named(model)].tokenizer

    def vocab_size(self, model: str | None = None) -> int:
        return self.cores[self._named(model)].vocab_size

    def _named(self, model: str | None) -> str:
        """`model` resolved; for none or `auto`, the first model (all share one tokenizer)."""
        return self.resolve(model) if model and model != "auto" else next(iter(self.cores))

    def max_model_len(self, requested: str | None = None) -> int:
        """The context length a request for `requested` gets."""
        if requested and requested != "auto":
            return self.cores[self.resolve(requested)].max_model_len
        # `auto` may go to any tier: promise only what every tier accepts.
        return min(c.max_model_len for c in self.cores.values())

    async def route(self, prompt_token_ids, params, requested: str, hints: RoutingHints) -> Decision:
        if requested != "auto":
            self.resolve(requested)  # raises UnknownModelError before any work
        return await self.router.route(self, prompt_token_ids, params, requested, hints)

    # ----- the server's API ----------------------------------------------------------------------
    async def submit(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, requested: str = "auto",
        hints: RoutingHints | None = None, sink: Sink | None = None, before_queue: Callable[[], None] | None = None,
        direct_sink: bool = False,
    ) -> list[Submission]:
        """Route every prompt (their probes run concurrently), validate each once against the
        engine it was routed to, then queue them in order; nothing stays queued unless all are
        admitted (a QueueFullError on the third prompt takes back the first two). One prompt keeps
        `request_id`; several get `request_id-i`. Each queued request gets its own copy of
        `params`. `before_queue` runs once everything is routed and valid, before anything is
        queued; what it raises is raised. `direct_sink`: `sink` is called on the engine's worker
        thread (the engine-core process's batching sink; see AsyncEngine). Raises
        InvalidRequestError, UnknownModelError, QueueFullError, EngineDeadError."""
        hints = hints or RoutingHints()
        check_prompts(prompts, max(c.max_model_len for c in self.cores.values()))
        routed = await asyncio.gather(*(self.route(p.ids, params, requested, hints) for p in prompts),
                                      return_exceptions=True)
        for d in routed:  # the first failing prompt's error, in prompt order
            if isinstance(d, BaseException):
                raise d
        decisions: list[Decision] = routed  # type: ignore[assignment]
        for p, d in zip(prompts, decisions):
            core = self.cores[d.model]
            self._refuse_self_draft(d)
            core.validate(p.ids, params, d.strategy)
            if params.n > core.config.max_waiting:  # never admissible: a 429 would mean "retry forever"
                raise InvalidRequestError(
                    f"n ({params.n}) is larger than {d.model}'s waiting queue ({core.config.max_waiting} sequences)",
                    param="n")
        if before_queue is not None:
            before_queue()
        subs: list[Submission] = []
        try:
            for i, (p, d, rid) in enumerate(zip(prompts, decisions, prompt_request_ids(request_id, len(prompts)))):
                to = (lambda item, i=i: sink(i, item)) if sink is not None else None
                movable = requested == "auto" and d.reason.startswith("plan:")
                if movable:
                    self._movable[rid] = d
                    while len(self._movable) > _MOVABLE_TRACKED:
                        self._movable.popitem(last=False)
                stream = await self.engine.add_request(
                    rid, p.ids, copy.copy(params), core=d.model, prompt=p.text, strategy=d.strategy, sink=to,
                    validated=True, movable=movable, direct=direct_sink)
                subs.append(Submission(i, rid, d, stream))
        except BaseException:
            for s in subs:
                s.abort()
            raise
        return subs

    def describe(self) -> list[ModelInfo]:
        """The resident models, in config order."""
        return [
            ModelInfo(
                name=name, tier=self.model_to_tier[name], path=str(core.model_dir), family=core.model_config.family,
                num_params=core.model_config.num_params, device=str(core.platform.device),
                dtype=str(core.dtype).removeprefix("torch."), vocab_size=core.vocab_size,
                max_model_len=core.max_model_len, block_size=core.block_size,
                num_blocks=core.block_manager.num_blocks, kv_cache_bytes=core.runner.kv_cache_bytes,
                strategies=tuple(sorted(_accepted_strategies(core), key=("plain", "pld", "draft").index)),
            )
            for name, core in self.cores.items()
        ]

    def stats(self, device: bool = True) -> DeploymentStats:
        """Live counts per model (exact: read from the engines), bandwidth from the telemetry, and
        with `device` the device memory in use."""
        snap = None
        try:
            snap = self.telemetry.snapshot(device=device)
        except Exception:  # noqa: BLE001 - a missing device counter must not cost the counts
            log.warning("telemetry snapshot failed", exc_info=True)
        models = {}
        for name, st in self.engine.stats().items():
            core = self.cores[name]
            runs = _accepted_strategies(core)
            eng = snap.engines.get(name) if snap is not None else None
            if eng is not None:
                achieved = eng.achieved_bandwidth
            else:  # no telemetry: the last step alone
                achieved = st.last_step_bytes / st.last_step_seconds if st.last_step_seconds > 0 else 0.0
            models[name] = ModelStats(
                name=name, tier=self.model_to_tier[name], num_running=st.num_running, num_waiting=st.num_waiting,
                kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total,
                num_preemptions=st.num_preemptions,
                spec_draft_tokens={p: n for p, n in st.spec_draft_tokens.items() if p in runs},
                spec_accepted_tokens={p: n for p, n in st.spec_accepted_tokens.items() if p in runs},
                achieved_bandwidth=achieved,
                bandwidth_utilization=eng.bandwidth_utilization if eng is not None and snap.peak_bandwidth else None,
                device_seconds_total=st.device_seconds_total, device_bytes_total=st.device_bytes_total,
            )
        return DeploymentStats(
            models=models, peak_bandwidth=snap.peak_bandwidth or None if snap is not None else None,
            device_memory_used_bytes=getattr(snap, "device_memory_used_bytes", None),
            busy_fraction=getattr(snap, "busy_fraction", None), load_utilization=getattr(snap, "load_utilization", None),
        )

    @property
    def alive(self) -> bool:
        return self.engine.alive

    def has_started(self, request_id: str) -> bool:
        """Whether an engine has scheduled the request (its prefill began): from then on it is being
        served, not queued. A read of the worker's state from the event loop: a stale answer only
        delays the server's view by one step."""
        for core in self.cores.values():
            req = core.requests.get(request_id)
            if req is not None and req.metrics.first_scheduled_time is not None:
                return True
        return False

    def shutdown(self) -> None:
        self.engine.shutdown()
