"""The simulated runner: the engine's `ModelRunner` with the forward replaced by a step-cost model.

It owns no tensors and reads no weights. Each `execute` takes the same `SchedulerOutput` the real
runner would, returns the same `StepResult` (tokens for every sequence the real one samples, prompt
logprobs where asked), and advances the virtual clock by what the step costs on the simulated
device. Tokens: the workload's reference continuation of the prompt when it has one, else a fixed
filler token (requests run with ignore_eos, so the length is max_tokens as on the real server).
Prompt logprobs give every position the workload's difficulty (the probe model's mean prompt NLL),
so the probe measures what it measured on the real models.
"""

from __future__ import annotations

from ..clock import VirtualClock
from ..engine.model_runner import StepResult, VerifyResult
from ..engine.sampler import SamplerOutput
from ..engine.scheduler import SchedulerOutput
from .cost import StepShape

FILLER_TOKEN = 32  # what a request without a reference continuation generates
UNKNOWN_DIFFICULTY = 3.0  # nats/token for a prompt the workload has no measurement of


class SimDevice:
    """The one device all simulated runners share: the clock, the cost model, which model stepped
    last (for the interleaving penalty), and engines made to fail (fault injection)."""

    def __init__(self, clock: VirtualClock, cost, tier_of: dict[str, str]) -> None:
        self.clock = clock
        self.cost = cost
        self.tier_of = tier_of  # engine name -> tier (the cost model is per tier)
        self.last: str | None = None
        self.dead: dict[str, float] = {}  # engine name -> virtual time from which its steps raise
        self.references: dict[tuple[int, ...], list[int]] = {}
        self.difficulty: dict[tuple[int, ...], float] = {}
        self.steps = 0

    def run_step(self, name: str, core, shape: StepShape) -> None:
        if name in self.dead and self.clock.now() >= self.dead[name]:
            raise RuntimeError(f"simulated device fault: {name} died at t={self.dead[name]:.3f} s")
        self.clock.advance(self.cost.step(self.tier_of[name], core, shape))
        self.last = name
        self.steps += 1


class SimRunner:
    """Drop-in for ModelRunner on the virtual device (built by EngineCore's `runner_factory`)."""

    def __init__(self, device: SimDevice, core, num_blocks: int) -> None:
        self.device = device
        self.core = core
        self.name = core.name
        cfg, elt = core.model_config, _elt(core.dtype)
        self.eos_token_ids: tuple[int, ...] = cfg.eos_token_ids
        self._weight_bytes = cfg.num_params * elt
        embed = cfg.vocab_size * cfg.hidden_size * elt
        # a decode step gathers the batch's rows of an untied input embedding; a tied one is read whole as the LM head
        self._step_weight_bytes = self._weight_bytes - (0 if cfg.tie_word_embeddings else embed)
        self.kv_cache_bytes = num_blocks * core.block_size * cfg.kv_bytes_per_token(core.dtype)
        self.filler = min(FILLER_TOKEN, cfg.vocab_size - 1)

    def weight_bytes(self) -> int:
        return self._weight_bytes

    def step_weight_bytes(self) -> int:
        return self._step_weight_bytes

    def execute(self, sched: SchedulerOutput, draft_probs=None) -> StepResult:
        decodes, prefills, chunks = sched.decodes, sched.prefills, sched.prefill_chunks
        dev = self.device
        forwards = 0
        if decodes or prefills:
            kv = sum(s.num_tokens for s in decodes) + sum(s.num_cached_tokens + n for s, n in zip(prefills, chunks))
            after_other = dev.last is not None and dev.last != self.name
            dev.run_step(self.name, self.core, StepShape(len(decodes), sum(chunks), kv, after_other))
            forwards += 1
        verified = self._verify(sched) if sched.verifies else []
        forwards += bool(verified)
        sampled = list(decodes)
        plp: dict[int, tuple[int, list[dict[int, float]]]] = {}
        for s, n in zip(prefills, chunks):
            start = s.num_cached_tokens
            if s.request.params.prompt_logprobs is not None and start < s.num_prompt_tokens:
                end = min(start + n, s.num_prompt_tokens - 1)
                d = dev.difficulty.get(tuple(s.request.prompt_token_ids), UNKNOWN_DIFFICULTY)
                plp[s.seq_id] = (start + 1, [{s.token_ids[p + 1]: -d} for p in range(start, end)])
            if start + n == s.num_tokens:
                sampled.append(s)
        tokens, lps = [], []
        for s in sampled:
            ref = dev.references.get(tuple(s.request.prompt_token_ids))
            k = s.num_output_tokens
            tok = ref[k] if ref is not None and k < len(ref) else self.filler
            tokens.append(tok)
            lps.append({tok: 0.0} if s.params.logprobs is not None else None)
        return StepResult(sampled=sampled, samples=SamplerOutput(tokens, None, lps), prompt_logprobs=plp,
                          verified=verified, num_forwards=max(forwards, 1))

    def _verify(self, sched: SchedulerOutput) -> list[VerifyResult]:
        """Verify rows as their own forward (the engine's split step): each row costs k+1 query
        positions; a proposal is accepted while it equals the workload's reference continuation
        (greedy verification against the reference), then the reference's next token follows."""
        dev = self.device
        rows = sched.verifies
        kv = sum(s.num_tokens - 1 + sched.verify_q for s in rows)
        after_other = dev.last is not None and dev.last != self.name
        dev.run_step(self.name, self.core, StepShape(len(rows) * sched.verify_q, 0, kv, after_other))
        out = []
        for s in rows:
            ref = dev.references.get(tuple(s.request.prompt_token_ids)) or []
            k = s.num_output_tokens
            props = list(s.spec_token_ids)
            a = 0
            while a < len(props) and k + a < len(ref) and props[a] == ref[k + a]:
                a += 1
            nxt = ref[k + a] if k + a < len(ref) else self.filler
            toks = props[:a] + [nxt]
            lps = [({t: 0.0} if s.params.logprobs is not None else None) for t in toks]
            out.append(VerifyResult(s, len(props), a, toks, lps))
        return out


def _elt(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
