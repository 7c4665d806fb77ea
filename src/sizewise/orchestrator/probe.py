"""The request probe: what a request is, measured before it is routed (a few ms).

Four signals:
  * surprisal: the prompt's mean -log p under the family's unigram token statistics (`TokenStats`,
    counted at calibration time over the family's text), a host-side lookup of microseconds, so it
    is present for every request at any load (the model probe below is skipped when it would be
    late). On the demo family it predicts the per-tier gap better than the probe model's
    difficulty does (docs/routing.md has the held-out numbers);
  * intent (`code` / `math` / `knowledge` / `chat`): from cheap text features (keywords,
    symbol and digit density, indentation, question words, pronouns), or zero-shot with the
    probe model when configured (a prompt template, the likelihood of each label word as its
    continuation, normalised over the labels; 1 - normalised entropy as confidence);
  * difficulty: the probe model's mean negative log-likelihood per token over the prompt
    (nats/token), from a prefill with `prompt_logprobs=0` run *through the probe model's own
    engine*. That run registers the prompt's full KV blocks in the engine's prefix cache, so
    when the request is then served by the probe model its prefill is mostly reused (prompt-
    logprob requests skip prefix-cache lookups but still register their blocks);
  * copyability: how much of the prompt a prompt-lookup (n-gram) proposer would have
    predicted from earlier in the prompt itself, i.e. a direct simulation of PLD acceptance.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from dataclasses import dataclass, field

from ..engine.spec.ngram import replay
from ..sampling_params import SamplingParams
from .policy import INTENTS, PolicySettings
from .telemetry import PROBE_PREFIX

_COPY_MAX_TOKENS = 8192  # copyability reads at most the prompt's last 8K tokens
# Copyability is a Python loop (~8 us a token): past this many tokens it runs in a worker thread,
# so a long prompt's probe does not stall the event loop (the GIL still switches every 5 ms).
_COPY_OFFLOAD_TOKENS = 1024
_FEATURE_MAX_CHARS = 4000  # intent features read at most the prompt's first 4K characters
_ZERO_SHOT_MAX_TOKENS = 96  # of the prompt, in the zero-shot template
_ZERO_SHOT_TEMPLATE = "Request: {text}\nThe request above is about (code, math, knowledge or chat):"
_ZERO_SHOT_LABELS = {"code": " code", "math": " math", "knowledge": " knowledge", "chat": " chat"}

_CODE_WORDS = re.compile(
    r"\b(def|class|import|return|self|lambda|elif|except|raise|None|True|False|print|"
    r"function|const|var|void|struct|impl|fn|typedef|namespace|println|printf|__init__)\b"
)
_CODE_SYMBOLS = set("(){}[]=:;_.<>#\"'`")
_MATH_WORDS = re.compile(
    r"\b(solve|compute|calculate|equation|sum|product|integral|derivative|prove|proof|theorem|"
    r"how many|how much|divided|times|plus|minus|percent|probability|sqrt|log|sin|cos)\b", re.I
)
_MATH_SYMBOLS = set("+-*/^=<>%")
_QUESTION_WORDS = re.compile(
    r"(^|[.?!\n]\s*)(what|who|when|where|why|how|which|explain|describe|define|list|name|"
    r"tell me about|compare)\b", re.I
)
_CHAT_WORDS = re.compile(
    r"\b(i|i'm|im|you|your|me|my|we|hi|hello|hey|thanks|thank you|please|sorry|lol|ok|okay|"
    r"feel|think|help)\b", re.I
)


@dataclass(slots=True)
class ProbeResult:
    intent: str
    intent_confidence: float  # max class probability (features) or 1 - H/ln 4 (zero-shot)
    intent_scores: dict[str, float]  # class probabilities
    intent_source: str  # "features" | "zero_shot"
    copyability: float  # fraction of prompt tokens an n-gram prompt lookup would have predicted
    repeat_fraction: float  # fraction of prompt positions whose preceding n-gram occurred before
    prompt_tokens: int
    difficulty: float | None = None  # probe model's mean NLL over the prompt prefix (nats/token)
    difficulty_tokens: int = 0  # predicted tokens behind `difficulty`
    probe_model: str | None = None
    ms: float = 0.0
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the model probe (difficulty, zero-shot) did not run
    surprisal: float | None = None  # mean -log p of the prompt under the family's unigram statistics

    def to_json(self) -> dict:
        d = {
            "intent": self.intent,
            "intent_confidence": round(self.intent_confidence, 4),
            "intent_scores": {k: round(v, 4) for k, v in self.intent_scores.items()},
            "intent_source": self.intent_source,
            "difficulty": None if self.difficulty is None else round(self.difficulty, 4),
            "difficulty_tokens": self.difficulty_tokens,
            "copyability": round(self.copyability, 4),
            "surprisal": None if self.surprisal is None else round(self.surprisal, 4),
            "repeat_fraction": round(self.repeat_fraction, 4),
            "prompt_tokens": self.prompt_tokens,
            "probe_model": self.probe_model,
            "ms": round(self.ms, 3),
        }
        if self.errors:
            d["errors"] = list(self.errors)
        if self.skipped:
            d["skipped"] = self.skipped
        return d


# ----- pure features ----------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class TokenStats:
    """Unigram statistics of a family's text: log p of every token id (add-one smoothed counts)."""

    logp: "np.ndarray"  # [vocab] float64
    tokens: int  # how many tokens were counted

    @classmethod
    def count(cls, id_lists, vocab_size: int) -> "TokenStats":
        import numpy as np

        counts = np.zeros(vocab_size, dtype=np.float64)
        n = 0
        for ids in id_lists:
            arr = np.asarray([t for t in ids if 0 <= t < vocab_size], dtype=np.int64)
            counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
            n += len(arr)
        return cls(np.log((counts + 1.0) / (n + vocab_size)), n)

    def surprisal(self, ids: list[int]) -> float | None:
        """Mean -log p over the prompt's ids (ids outside the table count as unseen)."""
        if not ids:
            return None
        import numpy as np

        v = len(self.logp)
        known = [t for t in ids if 0 <= t < v]  # filtered first: an id past int64 cannot become an index
        floor = -math.log(self.tokens + v)  # an unseen token's log p
        total = self.logp[np.asarray(known, dtype=np.int64)].sum() + floor * (len(ids) - len(known))
        return float(-total / len(ids))

    def to_json(self) -> dict:
        import numpy as np

        counts = np.rint(np.exp(self.logp) * (self.tokens + len(self.logp)) - 1.0).astype(np.int64)
        nz = np.nonzero(counts)[0]
        return {"vocab_size": len(self.logp), "tokens": self.tokens,
                "counts": {str(int(i)): int(counts[i]) for i in nz}}

    @classmethod
    def from_json(cls, d: dict) -> "TokenStats":
        import numpy as np

        try:
            v, n = int(d["vocab_size"]), int(d["tokens"])
            counts = np.zeros(v, dtype=np.float64)
            for k, c in d["counts"].items():
                counts[int(k)] = float(c)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"token statistics must be {{vocab_size, tokens, counts: {{id: count}}}} with ids "
                             f"below vocab_size: {e}") from None
        return cls(np.log((counts + 1.0) / (n + v)), n)


def copyability(ids: list[int], max_n: int = 3, min_n: int = 2) -> tuple[float, float]:
    """(hit rate, repeat fraction) of the prompt-lookup proposer replayed over `ids`.

    At each position the engine's own n-gram matcher (engine/spec/ngram.py, the one prompt lookup
    proposes with) is asked for its next token given the text before it. The hit rate is the
    fraction of positions predicted correctly (what PLD acceptance tends to track on continuations
    of this text); the repeat fraction counts positions with any match.
    """
    ids = ids[-_COPY_MAX_TOKENS:]
    min_n = max(1, min(min_n, max_n))
    positions, matched, hits = replay(ids, min_n, max_n)
    if positions <= 0:
        return 0.0, 0.0
    return hits / positions, matched / positions


def intent_features(text: str) -> dict[str, float]:
    """Class probabilities for code / math / knowledge / chat from surface features."""
    text = text[:_FEATURE_MAX_CHARS]
    chars = max(len(text), 1)
    lines = [ln for ln in text.splitlines() if ln.strip()] or [""]
    words = re.findall(r"[A-Za-z_']+", text)
    nwords = max(len(words), 1)
    nonspace = max(sum(not c.isspace() for c in text), 1)
    code_sym = sum(c in _CODE_SYMBOLS for c in text) / nonspace
    indented = sum(ln.startswith(("    ", "\t")) for ln in lines) / len(lines)
    line_ends = sum(ln.rstrip().endswith((":", "{", ";", ")", "}", ",")) for ln in lines) / len(lines)
    snake = len(re.findall(r"\b[a-z]+_[a-z_]+\b|\b[a-z]+[A-Z][a-zA-Z]+\b", text)) / nwords
    code_kw = len(_CODE_WORDS.findall(text)) / nwords
    digits = sum(c.isdigit() for c in text) / nonspace
    math_sym = sum(c in _MATH_SYMBOLS for c in text) / nonspace
    math_kw = len(_MATH_WORDS.findall(text)) / nwords
    questions = len(_QUESTION_WORDS.findall(text)) + text.count("?")
    letters = sum(c.isalpha() for c in text) / chars
    chat_kw = len(_CHAT_WORDS.findall(text)) / nwords
    short = 1.0 if nwords < 12 else 0.0
    # Hand-set linear scores (logits); the weights make each feature's typical range comparable.
    logits = {
        "code": 6 * code_sym + 3 * indented + 2 * line_ends + 4 * snake + 10 * code_kw,
        "math": 10 * digits + 6 * math_sym + 12 * math_kw - 2 * indented,
        "knowledge": 1.2 * min(questions, 3) + 2.5 * letters - 3 * code_sym - 2 * chat_kw,
        "chat": 8 * chat_kw + 1.0 * short + 0.5 * letters - 2 * code_sym,
    }
    m = max(logits.values())
    exp = {k: math.exp(v - m) for k, v in logits.items()}
    z = sum(exp.values())
    return {k: exp[k] / z for k in INTENTS}


# ----- the probe --------------------------------------------------------------------------
class Probe:
    """Runs the three signals for one request. Owns nothing global: ids come from a counter."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._ids = itertools.count()
        self._label_ids: dict[str, dict[str, list[int]]] = {}  # per probe model: label -> its tokens

    async def run(self, engine, core, core_name: str, prompt_token_ids: list[int], *, full: bool = True) -> ProbeResult:
        """`engine`: the AsyncEngine; `core`: the probe model's EngineCore (tokenizer, limits).
        `full=False` computes the model-free signals only (pinned requests)."""
        clock = engine.clock  # the engines' (virtual on the simulated device)
        t0 = clock.now()
        s = self.settings
        ids = list(prompt_token_ids)
        if len(ids) > _COPY_OFFLOAD_TOKENS:
            copy, repeat = await asyncio.to_thread(copyability, ids, s.copy_ngram)
        else:
            copy, repeat = copyability(ids, max_n=s.copy_ngram)
        # Ids the probe model's tokenizer cannot decode are left out of the features: whether the
        # prompt is valid is the serving engine's call (EngineCore.validate), after routing.
        known = [t for t in ids[: _FEATURE_MAX_CHARS // 2] if 0 <= t < core.vocab_size]
        text = core.tokenizer.decode(known, skip_special_tokens=True)
        scores = intent_features(text)
        res = ProbeResult(
            intent=max(scores, key=scores.get), intent_confidence=max(scores.values()), intent_scores=scores,
            intent_source="features", copyability=copy, repeat_fraction=repeat, prompt_tokens=len(ids),
            probe_model=core_name if full else None,
            surprisal=s.token_stats.surprisal(ids[:_FEATURE_MAX_CHARS]) if s.token_stats is not None else None,
        )
        if full:
            jobs = []
            if s.difficulty:
                jobs.append(self._difficulty(engine, core, core_name, ids, res))
            if s.intent_mode == "zero_shot":
                jobs.append(self._zero_shot(engine, core, core_name, text, res))
            if jobs:
                await asyncio.gather(*jobs)
        res.ms = (clock.now() - t0) * 1e3
        return res

    def _rid(self) -> str:
        return f"{PROBE_PREFIX}{next(self._ids)}-{id(self):x}"

    async def _difficulty(self, engine, core, core_name: str, ids: list[int], res: ProbeResult) -> None:
        # A prefix keeps the probe cheap on long prompts and within the probe model's context.
        n = min(len(ids), self.settings.probe_max_tokens, core.max_model_len - 1)
        if n < 2:  # one token predicts nothing: say so (the policy then counts the request as moderate)
            res.skipped = res.skipped or "difficulty: a 1-token prompt predicts no token"
            return
        pids = ids[:n]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        try:
            plp = None
            stream = await engine.add_request(self._rid(), pids, params, core=core_name)
            async for out in stream:
                if out.prompt_logprobs is not None:
                    plp = out.prompt_logprobs
        except Exception as e:  # noqa: BLE001 - a probe failure must never fail the request
            res.errors.append(f"difficulty: {type(e).__name__}: {e}")
            return
        if plp is None:
            res.errors.append("difficulty: engine returned no prompt logprobs")
            return
        lps = [d[t] for d, t in zip(plp[1:], pids[1:]) if d is not None and t in d]
        if lps:
            res.difficulty = -sum(lps) / len(lps)
            res.difficulty_tokens = len(lps)

    async def _zero_shot(self, engine, core, core_name: str, text: str, res: ProbeResult) -> None:
        """Label likelihoods under the probe model: log P(" <label>" | template(text)) for each
        label (whole label, all its tokens), normalised over the four labels. One prefill per
        label, batched in the probe engine's next step; byte-level tokenizers split the label
        words, so a single next-token distribution could not tell them apart."""
        tok = core.tokenizer
        labels = self._label_ids.get(core_name)
        if labels is None:
            labels = {k: tok.encode(w, add_special_tokens=False) for k, w in _ZERO_SHOT_LABELS.items()}
            self._label_ids[core_name] = labels
        body = tok.encode(text, add_special_tokens=False)[:_ZERO_SHOT_MAX_TOKENS]
        head = tok.encode(_ZERO_SHOT_TEMPLATE.format(text=tok.decode(body)), add_special_tokens=False)
        head = head[-(core.max_model_len - 2 - max(len(v) for v in labels.values())):]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

        async def label_logprob(ids: list[int]) -> float:
            plp = None
            async for out in await engine.add_request(self._rid(), head + ids, params, core=core_name):
                if out.prompt_logprobs is not None:
                    plp = out.prompt_logprobs
            return sum(plp[len(head) + j][t] for j, t in enumerate(ids))

        try:
            lps = await asyncio.gather(*(label_logprob(ids) for ids in labels.values()))
        except Exception as e:  # noqa: BLE001 - fall back to the feature scores
            res.errors.append(f"zero_shot: {type(e).__name__}: {e}")
            return
        m = max(lps)
        exp = [math.exp(v - m) for v in lps]
        z = sum(exp)
        probs = {k: e / z for k, e in zip(labels, exp)}
        h = -sum(p * math.log(p) for p in probs.values() if p > 0)
        res.intent_scores = probs
        res.intent = max(probs, key=probs.get)
        res.intent_confidence = 1.0 - h / math.log(len(probs))
        res.intent_source = "zero_shot"
