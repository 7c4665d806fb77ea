"""EngineCore: one resident model, a synchronous step loop over its scheduler and runner.

Not thread-safe by itself: `AsyncEngine` drives it from one worker thread. Several cores can
live in one process (each owns its own model, cache, scheduler, RNG); nothing here is global.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..clock import WALL, Clock
from ..errors import InvalidRequestError, QueueFullError
from ..models import CheckpointError, ModelConfig, load_model, parse_dtype
from ..models.loader import checkpoint_files, tokenizer_files
from ..platform import Platform, get_platform
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams, is_int
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import Detokenizer
from .model_runner import ModelRunner, StepResult, VerifyResult
from .sampler import rng_stream
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Request, Sequence
from .spec.draft import DraftItem, DraftProposal
from .spec.speculator import Speculator
from .spec.strategy import PROPOSERS, Strategy

_DRAFT_SEED_SALT = 0x5DEECE66D  # seeded draft sampling must not share the target's RNG stream

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class StepRecord:
    """The last step, as the stats report it."""

    seconds: float = 0.0  # this model's own share of the step (a draft model's proposals excluded)
    num_tokens: int = 0  # positions computed (verify rows: k+1 each, padding included)
    bytes: int = 0  # weights (once per forward) + KV read
    prefill_tokens: int = 0  # of num_tokens, prompt tokens prefilled


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prefix_cache_hit_tokens: int
    num_steps: int
    last_step_seconds: float
    last_step_num_tokens: int
    last_step_bytes: int  # weights + KV read by the last step
    last_step_prefill_tokens: int  # of last_step_num_tokens, prompt tokens prefilled (the rest: decode rows)
    prompt_tokens_total: int
    generation_tokens_total: int
    # this model's own work, all steps and drafting for other engines included (running totals):
    # wall seconds of its forwards (host prep and sampling around them too) and bytes they read
    device_seconds_total: float
    device_bytes_total: int
    # speculative decoding, per proposer ("pld", "draft"); see engine/spec/
    spec_draft_tokens: dict[str, int] = field(default_factory=dict)  # proposed and verified
    spec_accepted_tokens: dict[str, int] = field(default_factory=dict)
    spec_verify_steps: dict[str, int] = field(default_factory=dict)  # sequence-verifications
    spec_acceptance_ema: dict[str, float] = field(default_factory=dict)  # accepted / proposed

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer_files(Path(model_dir))
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise CheckpointError(f"cannot load a tokenizer from {str(model_dir)!r}: {e}") from None


class EngineCore:
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        platform: Platform | None = None,
        tokenizer=None,
        name: str | None = None,
        clock: Clock | None = None,
        runner_factory: Callable[["EngineCore", int], ModelRunner] | None = None,
    ) -> None:
        """`clock`: where step times and request timestamps come from (default: the wall clock).
        `runner_factory(core, num_blocks)`: builds the runner in place of loading the weights into a
        ModelRunner (the virtual device's runner, `sizewise.sim`; nothing here imports it)."""
        self.config = config = config or EngineConfig()
        self.clock = clock or WALL
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.model_config = cfg = ModelConfig.from_pretrained(self.model_dir)
        if runner_factory is None:
            checkpoint_files(self.model_dir)  # fail on missing weights before any slow loading
        self.platform = platform or get_platform(config.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.dtype = (
            self.platform.default_dtype(cfg.torch_dtype) if config.dtype == "auto" else parse_dtype(config.dtype)
        )
        if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
            # Refused, as vLLM does: positions past what the model was built for would silently
            # give garbage.
            raise ValueError(
                f"max_model_len {config.max_model_len} is larger than {self.name}'s max_position_embeddings "
                f"({cfg.max_position_embeddings}): lower max_model_len, or leave it unset to use the model's own"
            )
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        self._cap_reason = ""  # why max_model_len is below what was asked for; errors quote it
        if cfg.sliding_window and self.max_model_len > cfg.sliding_window:
            # No sliding-window attention kernel: cap the context so the window never applies.
            log.warning("%s: capping the context length %d to the sliding window (%d tokens)",
                        self.name, self.max_model_len, cfg.sliding_window)
            self.max_model_len = cfg.sliding_window
            self._cap_reason = f" (capped at the model's sliding window of {cfg.sliding_window} tokens)"
        self.block_size = config.block_size or self.platform.preferred_block_size
        self.eos_token_ids = tuple(cfg.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.vocab_size = cfg.vocab_size

        model = None if runner_factory is not None else load_model(
            self.model_dir, cfg, self.platform, self.dtype, self.max_model_len)
        num_blocks = self._plan_kv_blocks()
        # A sequence longer than the whole cache could never be (re)admitted: it would wait (or
        # preempt itself) forever. Cap the context at what the cache holds; validate() names it.
        if num_blocks * self.block_size < self.max_model_len:
            log.warning(
                "%s: the KV cache holds %d tokens (%d blocks x %d), less than max_model_len %d: "
                "capping the context length to it", self.name, num_blocks * self.block_size, num_blocks,
                self.block_size, self.max_model_len,
            )
            self.max_model_len = num_blocks * self.block_size
            self._cap_reason = (f" (capped by the KV cache: {num_blocks} blocks of {self.block_size} tokens; "
                                f"raise kv_cache_bytes)")
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        k = config.num_speculative_tokens
        self.spec: Speculator | None = None
        if k > 0:  # (validated before the scheduler takes k)
            self.spec = Speculator(self.name, k, config.prompt_lookup_min, config.prompt_lookup_max,
                                   config.spec_batching, self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max(config.max_num_batched_tokens, 1), self.max_model_len,
                            num_speculative_tokens=max(k, 0), spec_batching=config.spec_batching),
            self.block_manager,
        )
        self.runner = runner_factory(self, num_blocks) if runner_factory is not None else ModelRunner(
            model, cfg, self.platform, self.dtype, num_blocks, self.block_size, self.max_model_len,
            config.max_num_seqs, seed=config.seed, enforce_eager=config.enforce_eager,
            verify_q=k + 1 if k > 0 else 0, eos_token_ids=self.eos_token_ids,
        )
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._finished_between_steps: list[RequestOutput] = []  # stop_sample's finals, for the next step
        self._seq_ids = itertools.count()
        self._step_count = 0
        self._last_step = StepRecord()
        self._device_seconds = 0.0
        self._device_bytes = 0
        self._prompt_tokens = 0
        self._gen_tokens = 0
        self.weight_bytes = self.runner.weight_bytes()
        self.step_weight_bytes = self.runner.step_weight_bytes()  # what a decode step streams
        log.info(
            "%s: %s on %s, %.1fM params, KV cache %d blocks x %d tokens (%.1f MiB), max_model_len %d",
            self.name, cfg.family, self.platform.device, cfg.num_params / 1e6, num_blocks, self.block_size,
            self.runner.kv_cache_bytes / 2**20, self.max_model_len,
        )

    # ----- sizing ------------------------------------------------------------------------
    def _plan_kv_blocks(self) -> int:
        per_block = self.model_config.kv_bytes_per_token(self.dtype) * self.block_size
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        else:
            budget = int(self.platform.memory_info().free_bytes * self.config.kv_cache_memory_fraction)
        # More than every running sequence at full length can use is waste.
        useful = self.config.max_num_seqs * ((self.max_model_len + self.block_size - 1) // self.block_size)
        num_blocks = min(budget // per_block, useful)
        if num_blocks < 1:
            raise ValueError(
                f"KV budget of {budget} bytes holds no block of {per_block} bytes; raise kv_cache_bytes"
            )
        return int(num_blocks)

    # ----- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, strategy: str = "plain") -> None:
        """Raise InvalidRequestError naming the problem; nothing is queued."""
        self._strategy(strategy)
        n = len(prompt_token_ids)
        capped = self._cap_reason
        if n == 0:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens but this model's context length is {self.max_model_len} tokens{capped} "
                f"(the prompt must leave room for at least one generated token)",
                param="prompt",
            )
        for t in prompt_token_ids:  # (a None or a str must not slip through to the step)
            if not is_int(t):
                raise InvalidRequestError(f"token id {t!r} in the prompt is not an integer", param="prompt")
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    f"token id {t} in the prompt is outside the vocabulary [0, {self.vocab_size})", param="prompt"
                )
        params.validate(self.vocab_size)
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds this model's context "
                f"length of {self.max_model_len} tokens{capped}",
                param="max_tokens",
            )
        if n + params.min_tokens > self.max_model_len:  # with max_tokens unset, min_tokens could never be met
            raise InvalidRequestError(
                f"prompt ({n} tokens) plus min_tokens ({params.min_tokens}) exceeds this model's context "
                f"length of {self.max_model_len} tokens{capped}",
                param="min_tokens",
            )

    def _strategy(self, name: str) -> Strategy:
        if name == "plain":
            return Strategy.PLAIN
        if self.spec is None:
            raise InvalidRequestError(
                f"strategy {name!r} needs speculative decoding, which is off on {self.name!r} "
                f"(num_speculative_tokens=0); use 'plain'", param="strategy",
            )
        return self.spec.strategy(name)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None, arrival_time: float | None = None, strategy: str = "plain",
        validated: bool = False,
    ) -> Request:
        """`strategy`: plain | pld (prompt lookup) | pld_adaptive (prompt lookup that backs off while it
        fails) | draft (needs `attach_draft`); see `Strategy`.
        `validated`: the caller ran `validate` on these arguments already (it is not repeated)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if not validated:
            self.validate(prompt_token_ids, params, strategy)
        if len(self.scheduler.waiting) + params.n > self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} sequences)")
        strat = self._strategy(strategy)
        req = Request(request_id, list(prompt_token_ids), params, prompt, strategy=strat)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob (a 1-token prompt: only this)
        req.metrics.arrival_time = arrival_time if arrival_time is not None else self.clock.time()
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), req, i, prompt_token_ids)
            if self.spec is not None:
                self.spec.init_seq(seq, strat)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self._prompt_tokens += len(prompt_token_ids)
        return req

    def attach_draft(self, draft: "EngineCore") -> None:
        """Let requests with strategy 'draft' be proposed by `draft` (same tokenizer, resident)."""
        if self.spec is None:
            raise ValueError(f"speculative decoding is off on {self.name!r} (num_speculative_tokens=0)")
        if draft is self:
            raise ValueError("a core cannot be its own draft model")
        if draft.vocab_size != self.vocab_size:
            raise ValueError(
                f"draft {draft.name!r} has vocabulary size {draft.vocab_size}, target {self.name!r} has "
                f"{self.vocab_size}: draft and target must share one tokenizer"
            )
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"draft {draft.name!r} and target {self.name!r} do not share one tokenizer")
        self.spec.attach_draft(draft)

    @property
    def draft(self) -> "EngineCore | None":
        """The attached draft model's engine, if any."""
        return self.spec.draft.engine if self.spec is not None and self.spec.draft is not None else None

    # ----- drafting for a target engine (this engine being its draft model) ---------------
    def propose_drafts(self, items: list[DraftItem], k: int) -> dict[str, DraftProposal]:
        """Up to `item.limit` (<= k) proposed tokens per item, as work of this engine: one shadow
        sequence per item in this scheduler and cache (created at first use, caught up with the
        target's tokens), one catch-up forward then greedy or sampled decode forwards. The catch-up
        forward keeps to `max_num_batched_tokens` as a step does: shadows already caught up first,
        then catch-ups in chunks; a shadow not caught up by this forward proposes nothing this
        time (its target decodes plainly) and goes on where it stopped. Counted in this engine's
        device seconds and bytes, not in its steps."""
        t0 = self.clock.now()
        sched = self.scheduler
        kv_per_token = self.model_config.kv_bytes_per_token(self.dtype)
        shadows: list[tuple[DraftItem, Sequence]] = []
        # The decode batch must fit this engine's largest (graph) bucket; the rest decode plainly.
        for it in items[: self.config.max_num_seqs]:
            if len(it.token_ids) + k > self.max_model_len:
                continue
            d = sched.shadows.get(it.key)
            if d is None:
                d = sched.shadows[it.key] = self._new_shadow(it)
            else:
                d.token_ids.extend(it.token_ids[d.num_tokens:])
            shadows.append((it, d))
        budget = sched.config.max_num_batched_tokens
        active: list[tuple[DraftItem, Sequence]] = []
        chunk: dict[int, int] = {}
        for it, d in sorted(shadows, key=lambda x: x[1].num_uncomputed > 1):  # stable: caught-up ones first
            if budget <= 0:
                break
            # slots for the catch-up tokens plus the limit-1 proposals whose K/V the draft writes
            if sched.schedule_shadow(d, len(it.token_ids) + it.limit - 1):
                active.append((it, d))
                chunk[id(d)] = min(d.num_uncomputed, budget)
                budget -= chunk[id(d)]
        if not active:
            return {}
        limit = {id(d): it.limit for it, d in active}
        toks: dict[int, list[int]] = {id(d): [] for _, d in active}
        probs: dict[int, list] = {id(d): [] for _, d in active}
        nbytes = 0
        dec = [d for _, d in active if d.num_uncomputed == 1]
        pre = [d for _, d in active if d.num_uncomputed > 1]
        step = SchedulerOutput(decodes=dec, prefills=pre, prefill_chunks=[chunk[id(d)] for d in pre])
        for j in range(k):
            nbytes += self.step_weight_bytes + kv_per_token * (
                sum(d.num_tokens for d in step.decodes)
                + sum(d.num_cached_tokens + n for d, n in zip(step.prefills, step.prefill_chunks)))
            res = self.runner.execute(step)
            for d in step.decodes:
                d.num_cached_tokens += 1
            for d, n in zip(step.prefills, step.prefill_chunks):
                d.num_cached_tokens += n
            if j == 0:
                for d in step.decodes + step.prefills:
                    self.block_manager.commit(d)
            for i, d in enumerate(res.sampled):
                tok = res.samples.token_ids[i]
                d.token_ids.append(tok)
                toks[id(d)].append(tok)
                if res.samples.probs is not None and not d.params.greedy:
                    probs[id(d)].append(res.samples.probs[i])
            more = [d for d in res.sampled if len(toks[id(d)]) < limit[id(d)]]
            if not more:
                break
            step = SchedulerOutput(decodes=more)
        out = {}
        for it, d in active:
            del d.token_ids[len(it.token_ids):]  # proposals are not the draft's tokens until accepted
            q = probs[id(d)]
            out[it.key] = DraftProposal(toks[id(d)], torch.stack(q) if q else None)
        self._charge(self.clock.now() - t0, nbytes)
        return out

    def rollback_shadow(self, key: str, num_valid: int) -> None:
        """K/V of `key`'s first `num_valid` tokens stay valid; the rest is recomputed when needed."""
        d = self.scheduler.shadows.get(key)
        if d is not None and d.block_table:
            d.num_cached_tokens = min(d.num_cached_tokens, num_valid)

    def release_shadow(self, key: str) -> None:
        d = self.scheduler.shadows.pop(key, None)
        if d is not None:
            self.block_manager.free_seq(d)

    def _new_shadow(self, it: DraftItem) -> Sequence:
        # The draft only proposes: no logprobs, and (when seeded) an RNG stream of its own.
        params = dataclasses.replace(it.params, logprobs=None, prompt_logprobs=None, n=1)
        req = Request(it.key + "#draft", it.token_ids[: it.num_prompt_tokens], params)
        d = Sequence(next(self._seq_ids), req, it.index, it.token_ids[: it.num_prompt_tokens])
        d.token_ids.extend(it.token_ids[it.num_prompt_tokens:])
        if params.seed is not None:
            d.rng_stream = rng_stream(params.seed, it.index, salt=_DRAFT_SEED_SALT)
        return d

    def work_totals(self) -> tuple[float, int]:
        """(device seconds, bytes read) of this model's own work so far (steps and drafting)."""
        return self._device_seconds, self._device_bytes

    def _charge(self, seconds: float, nbytes: int) -> None:
        self._device_seconds += seconds
        self._device_bytes += nbytes

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Free everything the request holds now; returns its final (abort) delta."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        outs = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                if self.spec is not None:
                    self.spec.release(seq)
                outs.append(CompletionOutput(index=seq.index, finish_reason="abort"))
        req.metrics.finished_time = self.clock.time()
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished=True,
                             metrics=self._metrics(req))

    def stop_sample(self, request_id: str, index: int, stop_reason: str) -> RequestOutput | None:
        """Finish one sample on a stop string found by whoever detokenizes (an engine run with
        `detokenize=False` leaves stop strings to the API process), as `_check_finish` would have:
        its KV is freed now, not when its siblings end. Returns the request's final delta when that
        was its last sample; the next step returns it too, so step listeners see every finish."""
        req = self.requests.get(request_id)
        seq = next((s for s in req.seqs if s.index == index), None) if req is not None else None
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, "stop")
        seq.stop_reason = stop_reason
        if self.spec is not None:
            self.spec.release(seq)
        if not req.finished:
            return None
        out = self._make_delta(req)
        self._finished_between_steps.append(out)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = self.clock.now()
        draft_s = self.draft.work_totals()[0] if self.draft is not None else 0.0
        # Proposals first: the scheduler decides which of them are verified this step.
        draft_probs = self.spec.propose(self.scheduler.running) if self.spec is not None else {}
        sched = self.scheduler.schedule()
        late, self._finished_between_steps = self._finished_between_steps, []
        if sched.is_empty:
            if self.spec is not None:
                self.spec.end_step({})
            return late
        now = self.clock.time()
        for seq in sched.prefills + sched.decodes + sched.verifies:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        # Read before _postprocess appends the sampled tokens and frees finished sequences.
        kv_tokens = (
            sum(s.num_tokens for s in sched.decodes)
            + sum(s.num_cached_tokens + n for s, n in zip(sched.prefills, sched.prefill_chunks))
            + sum(s.num_tokens - 1 + sched.verify_q for s in sched.verifies)  # context_lens of verify
        )
        result = self.runner.execute(sched, draft_probs)
        out = late + self._postprocess(sched, result)
        # The draft model's proposals ran inside this step, as the draft engine's own work.
        drafted = (self.draft.work_totals()[0] - draft_s) if self.draft is not None else 0.0
        self._record_step(sched, result.num_forwards, kv_tokens, self.clock.now() - t0 - drafted)
        return out

    def _record_step(self, sched: SchedulerOutput, num_forwards: int, kv_tokens: int, seconds: float) -> None:
        """Each forward streams the weights once (split speculative batching runs two); kv_tokens:
        the context positions the forwards attended to."""
        nbytes = num_forwards * self.step_weight_bytes + kv_tokens * self.model_config.kv_bytes_per_token(self.dtype)
        self._step_count += 1
        self._last_step = StepRecord(seconds, sched.num_tokens, nbytes, sum(sched.prefill_chunks))
        self._charge(seconds, nbytes)

    def _postprocess(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        for s, n in zip(sched.prefills, sched.prefill_chunks):
            s.num_cached_tokens += n
        for s in sched.decodes:
            s.num_cached_tokens += 1
        for s in sched.prefills + sched.decodes:
            self.block_manager.commit(s)

        touched: dict[str, Request] = {}
        for seq_id, (first_pos, entries) in result.prompt_logprobs.items():
            seq = next(s for s in sched.prefills if s.seq_id == seq_id)
            req = seq.request
            if seq.index != 0:
                continue
            for j, entry in enumerate(entries):  # a recomputed chunk (preemption) adds nothing twice
                if first_pos + j == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(entry)
        now = self.clock.time()
        for i, seq in enumerate(result.sampled):
            self._append_token(seq, result.samples.token_ids[i], result.samples.logprobs[i], now)
            touched[seq.request.request_id] = seq.request
        accepted: dict[int, int] = {}
        for res in result.verified:
            self._append_verified(res, now)
            if res.num_proposed:  # a padded row, or one whose proposal the scheduler dropped, verified none
                accepted[res.seq.seq_id] = res.num_accepted
            touched[res.seq.request.request_id] = res.seq.request
        if self.spec is not None:
            self.spec.end_step(accepted)
        return [self._make_delta(req) for req in touched.values()]

    def _append_token(self, seq: Sequence, token: int, lp: dict[int, float] | None, now: float) -> None:
        seq.token_ids.append(token)
        self._gen_tokens += 1
        if lp is not None:
            seq.output_logprobs.append(lp)
            seq.cumulative_logprob += lp[token]
        m = seq.request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        self._check_finish(seq, token)

    def _append_verified(self, res: VerifyResult, now: float) -> None:
        """Tokens of one speculative verification, one at a time through the plain finish check."""
        seq = res.seq
        # The forward computed the last token and the m proposals; the m - a rejected ones roll back
        # (their K/V are overwritten later): 1 + m - (m - a) positions stay.
        seq.num_cached_tokens += 1 + res.num_accepted
        for token, lp in zip(res.tokens, res.logprobs):
            self._append_token(seq, token, lp, now)
            if seq.is_finished:  # a stop cuts the accepted tokens exactly where plain decode would
                break
        if not seq.is_finished:
            self.block_manager.commit(seq)

    def _check_finish(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stop_ids = seq.request.stop_ids
        stop_str = self.detokenizer.update(seq, 1) if self.config.detokenize else None
        reason, stop_reason = None, None
        if stop_str is not None:
            reason, stop_reason = "stop", stop_str
        elif seq.num_output_tokens >= p.min_tokens and (
            (not p.ignore_eos and token in self.eos_token_ids) or token in stop_ids
        ):
            reason = "stop"
            stop_reason = token if token in stop_ids else None
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if stop_str is None and self.config.detokenize:
                self.detokenizer.flush(seq)
            self.scheduler.finish(seq, reason)
            seq.stop_reason = stop_reason
            if self.spec is not None:
                self.spec.release(seq)

    def _make_delta(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.emitted_tokens:]
            finished = seq.is_finished
            if not new_tokens:
                continue
            text = self.detokenizer.emittable(seq, finished) if self.config.detokenize else ""
            lps = None
            if seq.params.logprobs is not None:
                lps = seq.output_logprobs[seq.emitted_logprobs:]
                seq.emitted_logprobs = len(seq.output_logprobs)
            seq.emitted_tokens = seq.num_output_tokens
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=new_tokens,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=lps, finish_reason=seq.finish_reason if finished else None,
                stop_reason=seq.stop_reason if finished else None,
                num_draft_tokens=seq.spec.num_draft_tokens if seq.spec is not None else 0,
                num_accepted_tokens=seq.spec.num_accepted_tokens if seq.spec is not None else 0,
            ))
        finished = req.finished
        plp = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and (
            len(req.prompt_logprobs) >= len(req.prompt_token_ids)
        ):
            plp = req.prompt_logprobs
            req.prompt_logprobs_sent = True
        if finished:
            req.metrics.finished_time = self.clock.time()
            self.requests.pop(req.request_id, None)
        return RequestOutput(
            req.request_id, req.prompt, req.prompt_token_ids, outs, finished=finished,
            prompt_logprobs=plp, metrics=self._metrics(req) if finished else None,
        )

    @staticmethod
    def _metrics(req: Request) -> dict:
        m = req.metrics
        return {
            "arrival_time": m.arrival_time,
            "first_scheduled_time": m.first_scheduled_time,
            "first_token_time": m.first_token_time,
            "last_token_time": m.last_token_time,
            "finished_time": m.finished_time,
            "num_preemptions": m.num_preemptions,
        }

    # ----- stats ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        last = self._last_step
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_tokens=self.block_manager.prefix_hits,
            num_steps=self._step_count,
            last_step_seconds=last.seconds,
            last_step_num_tokens=last.num_tokens,
            last_step_bytes=last.bytes,
            last_step_prefill_tokens=last.prefill_tokens,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._gen_tokens,
            device_seconds_total=self._device_seconds,
            device_bytes_total=self._device_bytes,
            **self._spec_stats(),
        )

    def step_counters(self) -> tuple[int, StepRecord]:
        """(steps so far, the last step): what a step listener reads after every step, without
        building an EngineStats (telemetry runs on the worker between two steps)."""
        return self._step_count, self._last_step

    def spec_totals(self) -> dict[str, tuple[int, int]] | None:
        """Per proposer, (draft tokens proposed and verified, accepted) so far; None where this
        engine does not speculate."""
        if self.spec is None:
            return None
        return {p: (c.draft_tokens, c.accepted_tokens) for p, c in self.spec.counters.items()}

    def _spec_stats(self) -> dict:
        c = self.spec.stats() if self.spec is not None else {}
        return {
            "spec_draft_tokens": {p: c[p].draft_tokens if c else 0 for p in PROPOSERS},
            "spec_accepted_tokens": {p: c[p].accepted_tokens if c else 0 for p in PROPOSERS},
            "spec_verify_steps": {p: c[p].verify_steps if c else 0 for p in PROPOSERS},
            "spec_acceptance_ema": {p: c[p].acceptance_ema if c else 0.0 for p in PROPOSERS},
        }
