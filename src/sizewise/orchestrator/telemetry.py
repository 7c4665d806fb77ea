"""Live telemetry of the co-resident engines and their shared device.

`Telemetry.on_step` is an `AsyncEngine.step_listeners` hook: the engine's one worker thread
calls it after every step of every core with `(core_name, core, outputs, seconds)`. Because
that thread steps the cores one after another (round-robin, never two at once), each step's
wall time belongs to the models that worked in it: the stepped one, and a draft model whose
proposals ran inside the step (its engine counts that work as its own: `EngineStats.
device_seconds_total` / `device_bytes_total`, attributed to the draft here). So bytes moved / own
seconds is each model's achieved bandwidth, every forward of a speculative step counted, and the
sum of the busy engines' step times is what one turn of the worker costs every request in flight
(the policy's latency estimate uses both).

Kept per engine (exponential moving averages, weight `alpha` for the newest step):
  * step time and a linear cost model, step seconds ~ fixed + per_row * decode rows + per_prompt_token
    * prefill tokens: a least-squares line over decode steps (their cost grows by the row, which on a
    CPU costs far more than a prompt token of a prefill) and the prefill steps' remainder per token,
    or what another prompt token adds to a prefill step where that is dearer;
  * bytes moved per step (weights once per forward + KV read, `EngineStats.last_step_bytes`) and the
    model's own seconds of it, and of drafting for another engine; achieved bandwidth (EMA bytes /
    EMA own seconds) and its ratio to the device's peak;
  * prompt and output tokens per finished request; speculative acceptance where the engine
    reports draft / accepted counters.
Read live at snapshot time: running / waiting counts and KV blocks used / total.

`snapshot()` is what the policy reads (per request, cheap) and what the server's Prometheus
gauges read at scrape time (`device=True` adds device memory and vendor counters).

On the worker, `on_step` only records the step (the engine's counters, its time) and the
requests' outputs: it runs between two steps, so at batch 1 it is part of every inter-token
time. The averages are folded from the records, in step order, when a snapshot is read or every
`_FOLD_EVERY` steps; a reader sees the same values whenever it reads.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..engine.core import EngineCore
from ..platform import Platform

PROBE_PREFIX = "sizewise-probe-"  # request ids of the orchestrator's own probes (not traffic)
_SMALL_STEP_TOKENS = 32  # the roofline guess's split of a step into fixed and per-token cost
_PREFILL_SPREAD = 0.25  # prefill sizes must spread this much (sd / mean) before their slope is read
_PREFILL_MIN_SD = 16.0  # ... and by this many tokens (sd)
_PREFILL_MIN_STEPS = 8  # ... over at least this many prefill steps
_MIN_ROW_VARIANCE = 0.25  # decode batch sizes must vary this much (rows^2) before the line's slope is trusted
_TRACKED_REQUESTS = 4096  # bound on per-request bookkeeping (aborted requests never finish)
_DEVICE_REFRESH_S = 1.0  # vendor counters (npu-smi is a subprocess) at most once a second
# A routed request reaches the worker within milliseconds unless it was never submitted (the
# server rejected it after routing): such a note must not make an idle engine look busy.
# (Until then, and until the engine's next step, an admitted request counts twice: a brief
# overestimate of the queue, on the safe side.)
_PENDING_TTL_S = 0.5
_RATE_WINDOW_S = 2.0  # arrival rate: sequences routed to an engine over this window
_BIAS_CLAMP = 3.0  # measured / predicted latency ratios are read within [1 / 2, this]
# A learned latency bias fades towards 1 without new evidence: a tier nothing is sent to any
# more (because its bias made it look slow) is not locked out for ever.
_BIAS_HALF_LIFE_S = 10.0
_IN_FLIGHT_HORIZON_S = 30.0  # predictions older than this are dropped (an aborted request never finishes)
_FOLD_EVERY = 32  # steps the worker records before it folds them into the averages itself (else a reader does)
_WINDOW_RESUM = 4096  # the device-time window's running sums are recomputed exactly every this many steps
_BACK_TO_BACK_S = 0.005  # a step that starts within this of the previous one's end follows it directly


class _Ema:
    """An exponential average that is the plain mean of its first 1 / alpha samples. Started at its
    first sample instead, the slow cost-line averages (alpha 0.02) gave that one sample half their
    weight after 32 steps: a warm-up's first step set the plan's step costs (issue 22's virtual CPU:
    small's per-row cost read 0, large's capacity 21.6 req/s where it holds about 11)."""

    __slots__ = ("alpha", "value", "n")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.n = 0

    def update(self, x: float) -> None:
        self.n += 1
        a = max(self.alpha, 1.0 / self.n)
        self.value = x if self.value is None else (1 - a) * self.value + a * x

    def get(self, default: float = 0.0) -> float:
        return default if self.value is None else self.value


@dataclass(slots=True)
class _EngineState:
    tier: str
    step_s: _Ema  # wall seconds of its steps (drafting done for it by another model included)
    bytes: _Ema  # bytes its own work read, per step or drafting turn
    own_s: _Ema  # seconds of its own work, per step or drafting turn (bandwidth = bytes / own_s)
    # decode steps: EMA moments of (rows, seconds) for a least-squares line
    dec_x: _Ema
    dec_y: _Ema
    dec_xx: _Ema
    dec_xy: _Ema
    # steps that prefill: EMA of prompt tokens, decode rows alongside, seconds
    pre_t: _Ema
    pre_d: _Ema
    pre_y: _Ema
    pre_tt: _Ema  # prefill steps' second moments: the marginal cost of a prompt token in a batch
    pre_ty: _Ema
    pre_td: _Ema
    prompt_tokens: _Ema
    output_tokens: _Ema
    num_steps: int = 0
    core_steps: int = 0  # the engine's own step count at the last step seen (empty steps do not advance it)
    work_seen: tuple[float, int] = (0.0, 0)  # its device seconds / bytes totals when last attributed
    last_step_time: float = 0.0
    # request id -> [output tokens so far, sample indices seen]
    requests: OrderedDict = field(default_factory=OrderedDict)
    spec_last: dict = field(default_factory=dict)  # strategy -> (draft, accepted) at the last step
    spec_rate: dict = field(default_factory=dict)  # strategy -> _Ema of accepted / draft
    pending: list = field(default_factory=list)  # (monotonic time, sequences) routed, not yet stepped
    # prompt ids -> (wall time routed, predicted seconds): matched when the request finishes
    predicted: OrderedDict = field(default_factory=OrderedDict)
    latency_bias: _Ema | None = None  # log of measured / predicted latency of finished requests
    bias_time: float = 0.0  # wall time of its last update
    routed: deque = field(default_factory=deque)  # (monotonic time, sequences) of the last _RATE_WINDOW_S
    routed_n: int = 0  # their sequences (kept as they enter and leave)
    # residual of a step over the cost line, when the step before it was this engine's / another's:
    # their difference is what interleaving costs a step here (caches, a second weight stream)
    resid_same: _Ema | None = None
    resid_switch: _Ema | None = None


@dataclass(slots=True, frozen=True)
class EngineTelemetry:
    """One engine at one moment (a copy: safe to read on any thread)."""

    name: str
    tier: str
    weight_bytes: int
    kv_bytes_per_token: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_running: int
    num_waiting: int  # includes requests routed here that the worker has not admitted yet
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    step_seconds: float  # EMA of wall time per step
    step_fixed_seconds: float  # cost model: step seconds ~ fixed + per_token * decode rows
    step_seconds_per_token: float  # per decode row
    bytes_per_step: float  # EMA of weights + KV bytes read per step
    achieved_bandwidth: float  # bytes / s while stepping
    bandwidth_utilization: float  # achieved / device peak
    avg_prompt_tokens: float
    avg_output_tokens: float
    spec_acceptance: dict[str, float]  # strategy -> accepted / proposed (measured only)
    calibrated: bool  # False: no step seen yet, the cost model is the roofline guess
    latency_bias: float = 1.0  # measured / predicted latency of recent requests (EMA; 1 until scored)
    arrival_rate: float = 0.0  # sequences/s routed here lately (they join the batch a request runs in)
    prefill_seconds_per_token: float | None = None  # per prompt token of a prefill; None: step_seconds_per_token
    own_step_seconds: float = 0.0  # EMA of this model's own seconds per step or drafting turn (bandwidth's divisor)
    switch_seconds: float = 0.0  # measured extra per step when it follows another engine's step
    finished_bias: float = 1.0  # measured / predicted latency of finished requests only (fading to 1)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def busy(self) -> bool:
        return self.num_running + self.num_waiting > 0

    def step_cost(self, tokens: float) -> float:
        """Estimated seconds of one decode step of this engine over `tokens` rows."""
        return self.step_fixed_seconds + self.step_seconds_per_token * max(tokens, 1.0)

    def prefill_cost(self, tokens: float) -> float:
        """Estimated seconds of one step that prefills `tokens` prompt tokens."""
        per = self.step_seconds_per_token if self.prefill_seconds_per_token is None else self.prefill_seconds_per_token
        return self.step_fixed_seconds + per * max(tokens, 1.0)


@dataclass(slots=True, frozen=True)
class TelemetrySnapshot:
    engines: dict[str, EngineTelemetry]
    peak_bandwidth: float  # bytes / s (measured copy or configured)
    achieved_bandwidth: float  # all engines' bytes / all engines' step time (EMA)
    bandwidth_utilization: float
    device_memory_used_bytes: int | None = None  # device-wide (RAM on CPU); only with device=True
    device_memory_total_bytes: int | None = None
    device_counters: dict[str, float] = field(default_factory=dict)  # NVML / npu-smi cross-check
    time: float = 0.0
    busy_fraction: float = 0.0  # share of the last _RATE_WINDOW_S the worker spent stepping
    load_utilization: float = 0.0  # share of it spent on per-token work (step time beyond the fixed part)

    def to_json(self) -> dict:
        return {
            "peak_bandwidth": self.peak_bandwidth,
            "achieved_bandwidth": self.achieved_bandwidth,
            "bandwidth_utilization": self.bandwidth_utilization,
            "device_memory_used_bytes": self.device_memory_used_bytes,
            "device_memory_total_bytes": self.device_memory_total_bytes,
            "device_counters": dict(self.device_counters),
            "engines": {
                n: {f: getattr(e, f) for f in EngineTelemetry.__dataclass_fields__} | {"kv_usage": e.kv_usage}
                for n, e in self.engines.items()
            },
        }


class Telemetry:
    def __init__(
        self,
        cores: dict[str, EngineCore],
        tiers: dict[str, str] | None = None,
        platform: Platform | None = None,
        peak_bandwidth: float | None = None,
        ema_alpha: float = 0.2,
    ) -> None:
        if not cores:
            raise ValueError("telemetry needs at least one engine")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.cores = dict(cores)
        self.platform = platform or next(iter(cores.values())).platform
        self.clock = next(iter(cores.values())).clock  # the engines' clock: wall, or the virtual device's
        # Measured once, before traffic: a copy during serving would compete with the engines.
        self.peak_bandwidth = float(peak_bandwidth) if peak_bandwidth else self.platform.peak_bandwidth()
        self.alpha = ema_alpha
        tiers = tiers or {}
        ema = lambda: _Ema(ema_alpha)  # noqa: E731
        # The cost model describes the hardware, which does not change step to step: slower
        # averages (about 50 steps) so the decode line sees batches of several sizes.
        slow = lambda: _Ema(ema_alpha / 10)  # noqa: E731
        self._state = {
            n: _EngineState(tier=tiers.get(n, n), step_s=ema(), bytes=ema(), own_s=ema(), dec_x=slow(), dec_y=slow(),
                            dec_xx=slow(), dec_xy=slow(), pre_t=slow(), pre_d=slow(), pre_y=slow(),
                            pre_tt=slow(), pre_ty=slow(), pre_td=slow(),
                            prompt_tokens=ema(), output_tokens=ema())
            for n in self.cores
        }
        for n, core in self.cores.items():  # work done before this listener existed is nobody's sample
            self._state[n].work_seen = core.work_totals()
        self._kv_bytes_per_token = {n: c.model_config.kv_bytes_per_token(c.dtype) for n, c in self.cores.items()}
        self._core_list = list(self.cores.values())
        self._steps: list[tuple] = []  # steps recorded by on_step, not folded into the averages yet
        self._device_s = _Ema(ema_alpha)
        self._device_bytes = _Ema(ema_alpha)
        self._lock = threading.Lock()
        self._device_cache: tuple[float, dict[str, float]] = (-math.inf, {})
        self._last_core: tuple[str, float] | None = None  # (engine, monotonic end) of the last step
        self._window: deque = deque()  # (monotonic end, seconds, per-token seconds) of recent steps
        # Their sums, kept as steps enter and leave: a snapshot (read per routed request) and a step
        # cost O(1), not O(steps in the window), which is thousands at a millisecond step.
        self._win_busy = 0.0
        self._win_load = 0.0
        self._win_appends = 0

    def attach(self, engine) -> None:
        """Register on an AsyncEngine (its worker thread calls `on_step`)."""
        if self.on_step not in engine.step_listeners:
            engine.step_listeners.append(self.on_step)

    # ----- worker thread ----------------------------------------------------------------
    def on_step(self, name: str, core: EngineCore, outputs, seconds: float) -> None:
        # On the worker, between two steps: at batch 1 this is part of every inter-token time. So it
        # only records what the step left (the engine's counters, not a whole EngineStats) and the
        # requests' outputs; the averages are folded from the records when a snapshot is read (the
        # router, /metrics) or every _FOLD_EVERY steps, in step order: what a reader sees is the same.
        st = self._state.get(name)
        if st is None:
            return
        num_steps, last = core.step_counters()
        with self._lock:
            st.pending.clear()  # the worker drained its inbox before this step
            if num_steps == st.core_steps and not outputs:
                # Nothing was scheduled (the core's last request was aborted after the worker's turn
                # began): no forward ran, and the counters still describe the previous step.
                return
            st.core_steps = num_steps
            others = [c.work_totals() for c in self._core_list] if len(self._core_list) > 1 else None
            self._steps.append((name, st, core, seconds, last, core.work_totals(), others, self.clock.now(),
                                core.spec_totals()))
            if outputs:
                self._note_outputs(st, outputs)
            if len(self._steps) >= _FOLD_EVERY:
                self._fold()

    def _note_outputs(self, st: _EngineState, outputs) -> None:
        """The requests' side of a step (under the lock): prompt and output lengths, latency scores."""
        requests = st.requests
        for out in outputs:
            rid = out.request_id
            if rid.startswith(PROBE_PREFIX):
                continue
            seen = requests.get(rid)
            if seen is None:
                st.prompt_tokens.update(len(out.prompt_token_ids))
                seen = requests[rid] = [0, set()]
                if len(requests) > _TRACKED_REQUESTS:
                    requests.popitem(last=False)
            for o in out.outputs:
                seen[0] += len(o.token_ids)
                seen[1].add(o.index)
            if out.finished:
                self._score_prediction(st, out)
                # Per sample: a delta carries only the samples that produced tokens in its step,
                # so the samples are those seen over the request's life, not in its last delta.
                requests.pop(rid, None)
                tokens, indices = seen
                st.output_tokens.update(tokens / max(len(indices), 1))

    def _fold(self) -> None:
        """Fold the recorded steps into the averages, oldest first (under the lock)."""
        steps, self._steps = self._steps, []
        for name, st, core, seconds, last, totals, others, now, spec in steps:
            ntok = max(last.num_tokens, 1)
            st.num_steps += 1
            st.last_step_time = now
            st.step_s.update(seconds)
            st.bytes.update(last.bytes)
            st.own_s.update(last.seconds)
            st.work_seen = totals
            drafted = self._attribute_drafting(name, others) if others is not None else 0
            self._device_s.update(seconds)
            self._device_bytes.update(last.bytes + drafted)
            prefill = min(last.prefill_tokens, ntok)
            switched = self._note_interleave(name, st, core, prefill, ntok - prefill, seconds, now)
            # The cost line is the engine's own (steps that did not follow another engine's), so what
            # interleaving adds is measured against it, not folded into it; until it has such steps,
            # every step counts.
            own = not switched or (st.dec_x.value if prefill == 0 else st.pre_t.value) is None
            if own and prefill == 0:
                st.dec_x.update(ntok)
                st.dec_y.update(seconds)
                st.dec_xx.update(ntok * ntok)
                st.dec_xy.update(ntok * seconds)
            elif own:
                st.pre_t.update(prefill)
                st.pre_d.update(ntok - prefill)
                st.pre_y.update(seconds)
                st.pre_tt.update(prefill * prefill)
                st.pre_ty.update(prefill * seconds)
                st.pre_td.update(prefill * (ntok - prefill))
            if spec is not None:
                self._update_spec(st, spec)

    def _attribute_drafting(self, stepped: str, totals: list[tuple[float, int]]) -> int:
        """Work other engines did inside `stepped`'s step (a draft model's proposals): one sample
        of their own bytes and seconds each, from their work totals after the step (`totals`, in
        the order of `cores`). Returns the bytes."""
        total = 0
        for other, (secs, byts) in zip(self.cores, totals):
            st = self._state[other]
            if other == stepped:
                continue
            s0, b0 = st.work_seen
            ds, db = secs - s0, byts - b0
            if ds > 0:
                st.work_seen = (secs, byts)
                st.bytes.update(db)
                st.own_s.update(ds)
                total += db
        return total

    def _note_interleave(self, name: str, st: _EngineState, core: EngineCore, prefill: int, rows: int,
                         seconds: float, now: float) -> bool:
        """The step's residual over its engine's cost line, filed by whether the step before it (within
        a few ms: back to back) was another engine's; and the device-time window. True: it followed
        another engine's step."""
        fixed, per_row, per_prompt = self._cost_model(st, core)
        line = fixed + per_row * rows + (per_row if per_prompt is None else per_prompt) * prefill
        last = self._last_core
        switched = False
        if last is not None and now - seconds - last[1] < _BACK_TO_BACK_S:
            switched = last[0] != name
            attr = "resid_switch" if switched else "resid_same"
            if getattr(st, attr) is None:
                setattr(st, attr, _Ema(self.alpha / 2))
            getattr(st, attr).update(seconds - line)
        self._last_core = (name, now)
        per_token = max(seconds - fixed, 0.0)
        self._window.append((now, seconds, per_token))
        self._win_busy += seconds
        self._win_load += per_token
        self._win_appends += 1
        if self._win_appends % _WINDOW_RESUM == 0:  # running sums: keep float drift bounded
            self._win_busy = math.fsum(x[1] for x in self._window)
            self._win_load = math.fsum(x[2] for x in self._window)
        self._evict_window(now - _RATE_WINDOW_S)
        return switched

    def _evict_window(self, cutoff: float) -> None:
        """Drop the window's steps that ended before `cutoff` (under the lock), keeping its sums."""
        w = self._window
        while w and w[0][0] < cutoff:
            _, secs, per_token = w.popleft()
            self._win_busy -= secs
            self._win_load -= per_token
        if not w:
            self._win_busy = self._win_load = 0.0

    @staticmethod
    def _switch_seconds(st: _EngineState) -> float:
        if st.resid_switch is None:
            return 0.0
        same = st.resid_same.get() if st.resid_same is not None else 0.0
        return max(st.resid_switch.get() - same, 0.0)

    @staticmethod
    def _update_spec(st: _EngineState, totals: dict[str, tuple[int, int]]) -> None:
        # The engine's counters are cumulative per proposer (EngineCore.spec_totals): this step's
        # acceptance rate is the growth since the last step seen.
        for strat, (d, a) in totals.items():
            d0, a0 = st.spec_last.get(strat, (0, 0))
            st.spec_last[strat] = (d, a)
            if d > d0:
                st.spec_rate.setdefault(strat, _Ema(st.step_s.alpha)).update((a - a0) / (d - d0))

    @staticmethod
    def _score_prediction(st: _EngineState, out) -> None:
        """The policy's latency model, checked against what happened: measured (routed -> finished)
        over predicted, an EMA the policy multiplies its estimates by (clamped), so what the model
        leaves out (the batch growing while the request runs, the server's own time) is learned."""
        hit = st.predicted.pop(tuple(out.prompt_token_ids), None)
        fin = (out.metrics or {}).get("finished_time")
        if hit is None or fin is None or hit[1] <= 0:
            return
        # In logs, clamped: one request delayed by the host must not swing every estimate.
        ratio = min(max((fin - hit[0]) / hit[1], 0.5), _BIAS_CLAMP)
        if st.latency_bias is None:
            st.latency_bias = _Ema(st.step_s.alpha)
        st.latency_bias.update(math.log(ratio))
        st.bias_time = fin

    @staticmethod
    def _finished_bias(st: _EngineState, now: float) -> float:
        """The finished requests' latency bias, fading towards 1 without new ones."""
        if st.latency_bias is None:
            return 1.0
        return math.exp(st.latency_bias.get(0.0) * 0.5 ** (max(now - st.bias_time, 0.0) / _BIAS_HALF_LIFE_S))

    @classmethod
    def _bias(cls, st: _EngineState, now: float) -> float:
        """The latency bias the policy reads: the finished requests' (fading without new ones), or
        more when most requests still in flight there have already run past their prediction (their
        ratio is at least elapsed / predicted). Without the second, a burst learns nothing until its
        first requests finish, by when every request of the burst has been routed."""
        learned = math.log(cls._finished_bias(st, now))
        while st.predicted and now - next(iter(st.predicted.values()))[0] > _IN_FLIGHT_HORIZON_S:
            st.predicted.popitem(last=False)
        late = sorted(min((now - t0) / p, _BIAS_CLAMP) for t0, p in st.predicted.values())
        if late and late[len(late) // 2] > 1.0:
            learned = max(learned, math.log(late[len(late) // 2]))
        return math.exp(learned)

    def forget_latency(self) -> None:
        """Drop what was learned about latency (bias, pending predictions, arrival rates): a
        benchmark starts every run from the same state."""
        with self._lock:
            for st in self._state.values():
                st.latency_bias = None
                st.predicted.clear()
                st.routed.clear()
                st.routed_n = 0

    # ----- event loop side ---------------------------------------------------------------
    def note_routed(self, name: str, n: int = 1, prompt_token_ids: list[int] | None = None,
                    predicted_ms: float | None = None) -> None:
        """A request was just sent to `name`; count it as waiting until the worker's next step
        there, so a burst of arrivals between two steps does not all see an empty queue. With a
        prediction, its finish is later scored against it (`latency_bias`)."""
        st = self._state.get(name)
        if st is not None:
            with self._lock:
                now = self.clock.now()
                st.pending.append((now, n))
                st.routed.append((now, n))
                st.routed_n += n
                if prompt_token_ids is not None and predicted_ms:
                    st.predicted[tuple(prompt_token_ids)] = (self.clock.time(), predicted_ms / 1e3)
                    st.predicted.move_to_end(tuple(prompt_token_ids))  # kept in the order routed
                    if len(st.predicted) > _TRACKED_REQUESTS:
                        st.predicted.popitem(last=False)

    def snapshot(self, device: bool = False) -> TelemetrySnapshot:
        engines = {}
        with self._lock:
            if self._steps:
                self._fold()
            for name, core in self.cores.items():
                engines[name] = self._engine(name, core, self._state[name])
            dev_s, dev_b = self._device_s.get(), self._device_bytes.get()
            self._evict_window(self.clock.now() - _RATE_WINDOW_S)
            busy = self._win_busy / _RATE_WINDOW_S
            load = min(self._win_load, self._win_busy) / _RATE_WINDOW_S
        achieved = dev_b / dev_s if dev_s > 0 else 0.0
        snap = dict(
            engines=engines, peak_bandwidth=self.peak_bandwidth, achieved_bandwidth=achieved,
            bandwidth_utilization=achieved / self.peak_bandwidth if self.peak_bandwidth else 0.0,
            time=self.clock.time(), busy_fraction=min(busy, 1.0), load_utilization=min(load, 1.0),
        )
        if device:
            mem = self.platform.memory_info()
            snap.update(
                device_memory_used_bytes=mem.total_bytes - mem.free_bytes,
                device_memory_total_bytes=mem.total_bytes,
                device_counters=self._device_counters(),
            )
        return TelemetrySnapshot(**snap)

    def _engine(self, name: str, core: EngineCore, st: _EngineState) -> EngineTelemetry:
        # Live counters (cheap reads of lengths; the worker thread mutates them under the GIL).
        stats = core.stats()
        step_s = st.step_s.get()
        byts = st.bytes.get()
        own_s = st.own_s.get()
        kvpt = self._kv_bytes_per_token[name]
        fixed, per_tok, per_prompt = self._cost_model(st, core)
        achieved = byts / own_s if own_s > 0 else 0.0
        return EngineTelemetry(
            name=name, tier=st.tier, weight_bytes=core.weight_bytes, kv_bytes_per_token=kvpt,
            block_size=core.block_size, max_num_seqs=core.config.max_num_seqs,
            max_num_batched_tokens=core.config.max_num_batched_tokens, max_model_len=core.max_model_len,
            num_running=stats.num_running, num_waiting=stats.num_waiting + self._pending(st),
            kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
            num_steps=st.num_steps, step_seconds=step_s, step_fixed_seconds=fixed, step_seconds_per_token=per_tok,
            bytes_per_step=byts, achieved_bandwidth=achieved,
            bandwidth_utilization=achieved / self.peak_bandwidth if self.peak_bandwidth else 0.0,
            avg_prompt_tokens=st.prompt_tokens.get(0.0), avg_output_tokens=st.output_tokens.get(0.0),
            spec_acceptance={k: e.get() for k, e in st.spec_rate.items()},
            calibrated=st.num_steps > 0,
            latency_bias=self._bias(st, self.clock.time()),
            arrival_rate=self._rate(st), prefill_seconds_per_token=per_prompt, own_step_seconds=own_s,
            switch_seconds=self._switch_seconds(st), finished_bias=self._finished_bias(st, self.clock.time()),
        )

    def _rate(self, st: _EngineState) -> float:
        cutoff = self.clock.now() - _RATE_WINDOW_S
        while st.routed and st.routed[0][0] < cutoff:
            st.routed_n -= st.routed.popleft()[1]
        return st.routed_n / _RATE_WINDOW_S

    def _pending(self, st: _EngineState) -> int:
        cutoff = self.clock.now() - _PENDING_TTL_S
        st.pending[:] = [p for p in st.pending if p[0] >= cutoff]
        return sum(n for _, n in st.pending)

    def _cost_model(self, st: _EngineState, core: EngineCore) -> tuple[float, float, float | None]:
        """(fixed seconds, seconds per decode row, seconds per prefilled prompt token) of one step.
        Decode: the least-squares line over decode steps once their batch sizes vary; until then
        half the observed cost fixed, half per row (a neutral guess). Prefill: what a prefill step
        costs beyond that line, per prompt token, or, once enough prefills of different sizes were
        seen, the least-squares slope over their prompt tokens where that is dearer. With no step
        seen, the bandwidth roofline
        (weights once per step) split the same way."""
        x, y = st.dec_x.value, st.dec_y.value
        if x is None:
            if st.pre_t.value is None:
                fixed = core.step_weight_bytes / self.peak_bandwidth if self.peak_bandwidth else 0.0
                return fixed, fixed / _SMALL_STEP_TOKENS, None
            # only prefills seen: the same neutral split over their tokens
            t, yp = st.pre_t.value, st.pre_y.value
            return yp / 2, yp / (2 * max(t, 1.0)), None
        var = st.dec_xx.value - x * x
        slope = (st.dec_xy.value - x * y) / var if var >= _MIN_ROW_VARIANCE else y / (2 * max(x, 1.0))
        slope = max(slope, 0.0)
        fixed = y - slope * x
        if fixed < 0.0:  # a line through the origin at the mean instead
            fixed, slope = 0.0, y / max(x, 1.0)
        per_prompt = None
        if st.pre_t.value is not None:
            t = st.pre_t.value
            rest = st.pre_y.value - fixed - slope * st.pre_d.value
            per_prompt = max(rest, 0.0) / max(t, 1.0)  # what one prefill step costs per prompt token
            # ... or, once prefills of several sizes were seen, what another prompt token adds to a
            # step, where that is dearer: a loaded engine prefills several prompts at once, and where
            # one prompt alone is memory-bound and many are compute-bound (an accelerator) the
            # per-step ratio prices the loaded steps' prompts too cheaply.
            var_t = st.pre_tt.value - t * t
            # Read only from enough prefills of clearly different sizes: from a few, or from a spread
            # of a few tokens, the slope is mostly noise and the max() would keep its high draws.
            if st.pre_tt.n >= _PREFILL_MIN_STEPS and var_t >= max(_PREFILL_SPREAD * t, _PREFILL_MIN_SD) ** 2:
                cov_ty = st.pre_ty.value - t * st.pre_y.value
                cov_td = st.pre_td.value - t * st.pre_d.value
                per_prompt = max(per_prompt, (cov_ty - slope * cov_td) / var_t)
        return fixed, slope, per_prompt

    def _device_counters(self) -> dict[str, float]:
        t, cached = self._device_cache
        now = self.clock.now()
        if now - t >= _DEVICE_REFRESH_S:
            try:
                cached = dict(self.platform.device_counters())
            except Exception:  # noqa: BLE001 - a cross-check, never required
                cached = {}
            self._device_cache = (now, cached)
        return cached
