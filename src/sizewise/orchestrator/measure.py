"""What calibration measures on a live deployment: each request's probe signals and each tier's
quality on it (the mean NLL, nats/token, of a reference continuation under that tier).

Calibration text is either the demo family's held-out split (windows of held-out documents: the
next tokens of the document are the reference) or the user's own prompts (`--calibration-data
FILE`, JSONL): a line's `completion` is its reference when given, else the top tier's greedy
continuation is (the gap to the top tier is then what the policy predicts: how far a smaller
tier's answer is from the top tier's, in the top tier's own terms).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..sampling_params import SamplingParams
from .policy import TIER_ORDER


@dataclass(slots=True)
class Item:
    kind: str  # code | prose | user (a prompt from a calibration file)
    source: str  # held-out file, topic, or "FILE:line"
    prompt: list[int]
    ref: list[int] | None  # reference continuation; None: the top tier's greedy continuation


@dataclass(slots=True)
class Sample:
    """One calibration request: the signals the probe measured, each tier's reference NLL, and the
    prompt NLL under each tier (for the prompt-gap signal, measured whether or not it is kept)."""

    item: Item
    signals: dict[str, float]
    nll: dict[str, float]  # tier -> mean NLL of the reference continuation
    prompt_nll: dict[str, float]  # tier -> mean NLL over the prompt itself


def held_out_docs() -> list[tuple[str, str, str]]:
    """(kind, source, text) of the demo family's held-out split."""
    from .. import demo

    s = demo.split()
    docs = [("code", rel, text) for rel in s.held_out_code if (text := demo.read_code(rel))]
    topics = demo.prose_topics()
    return docs + [("prose", k, topics[k]) for k in s.held_out_prose]


def held_out_items(tokenizer, n: int, prompt_tokens: int, ref_tokens: int, code_frac: float, seed: int) -> list[Item]:
    """`n` windows of the held-out split: a prompt of `prompt_tokens` and the next `ref_tokens`."""
    rng = random.Random(seed)
    need = prompt_tokens + ref_tokens
    pools: dict[str, list[tuple[str, list[int]]]] = {"code": [], "prose": []}
    for kind, src, text in held_out_docs():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= need:
            pools[kind].append((src, ids))
    for kind, pool in pools.items():
        if not pool:
            raise ValueError(f"no held-out {kind} document has {need} tokens; use shorter prompts or references")
    items = []
    for _ in range(n):
        kind = "code" if rng.random() < code_frac else "prose"
        src, ids = rng.choice(pools[kind])
        start = rng.randrange(0, len(ids) - need + 1)
        items.append(Item(kind, src, ids[start:start + prompt_tokens], ids[start + prompt_tokens:start + need]))
    return items


def file_items(path: str | Path, tokenizer, max_prompt_tokens: int) -> list[Item]:
    """Calibration prompts from a JSONL file: one object per line with `prompt` (text) and
    optionally `completion` (its reference continuation). Errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read calibration data {str(path)!r}: {e.strerror or e}") from None
    items = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{no}: not JSON ({e.msg}); each line must be an object like "
                             f'{{"prompt": "..."}}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"{path}:{no}: each line needs a non-empty string `prompt` "
                             f"(and optionally a string `completion`)")
        comp = obj.get("completion")
        if comp is not None and not isinstance(comp, str):
            raise ValueError(f"{path}:{no}: `completion` must be a string")
        prompt = tokenizer.encode(obj["prompt"], add_special_tokens=False)[-max_prompt_tokens:]
        if len(prompt) < 2:
            raise ValueError(f"{path}:{no}: the prompt has {len(prompt)} token(s); calibration needs at least 2")
        ref = tokenizer.encode(comp, add_special_tokens=False) if comp else None
        items.append(Item("user", f"{path.name}:{no}", prompt, ref or None))
    if not items:
        raise ValueError(f"{path}: no prompts (expected JSONL lines like {{\"prompt\": \"...\"}})")
    return items


def family_token_stats(tokenizer, items: list[Item] | None = None, max_tokens: int = 2_000_000):
    """Unigram statistics of the family's text for the surprisal signal: the demo family's training
    split (what its models were trained on; never the held-out split the benchmarks draw from), or
    for a user's calibration data, its prompts and completions."""
    from .probe import TokenStats

    vocab = len(tokenizer)
    if items is not None:
        return TokenStats.count([it.prompt + (it.ref or []) for it in items], vocab)
    from .. import demo

    s = demo.split()
    topics = demo.prose_topics()
    texts = [topics[k] for k in s.train_prose] + [demo.read_code(r) for r in s.train_code]
    lists, n = [], 0
    for t in texts:
        if not t:
            continue
        ids = tokenizer.encode(t, add_special_tokens=False)
        lists.append(ids)
        n += len(ids)
        if n >= max_tokens:
            break
    return TokenStats.count(lists, vocab)


async def _nll(engine, core: str, ids: list[int], start: int, rid: str) -> float:
    """Mean NLL of ids[start:] given what precedes each token, through the engine."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    plp = None
    async for out in await engine.add_request(rid, ids, params, core=core):
        if out.prompt_logprobs is not None:
            plp = out.prompt_logprobs
    return -statistics.fmean(plp[j][ids[j]] for j in range(max(start, 1), len(ids)))


async def measure(deployment, router, items: list[Item], ref_tokens: int = 32) -> list[Sample]:
    """Probe every item with the router's real probe and score every tier on it. Items without a
    reference get the top tier's greedy continuation of `ref_tokens` tokens first."""
    from .policy import signals_of

    tiers = [t for t in TIER_ORDER if t in deployment.tier_to_model]
    top = deployment.tier_to_model[tiers[-1]]
    _, probe_model, _ = router.bind(deployment)
    core = deployment.cores[probe_model]
    eng = deployment.engine
    for i, it in enumerate(items):
        if it.ref is None:
            params = SamplingParams(max_tokens=ref_tokens, temperature=0.0, ignore_eos=True)
            toks: list[int] = []
            async for out in await eng.add_request(f"calib-ref-{i}", it.prompt, params, core=top):
                toks += [t for o in out.outputs for t in o.token_ids]
            it.ref = toks
    samples = []
    for i, it in enumerate(items):
        res = await router.probe.run(eng, core, probe_model, it.prompt)
        nll, pnll = {}, {}
        for t in tiers:
            m = deployment.tier_to_model[t]
            nll[t], pnll[t] = await asyncio.gather(
                _nll(eng, m, it.prompt + it.ref, len(it.prompt), f"calib-{m}-{i}"),
                _nll(eng, m, it.prompt, 1, f"calib-p-{m}-{i}"))
        sig = signals_of(res)
        sig["prompt_gap"] = pnll[tiers[0]] - pnll[tiers[-1]]  # what a top-tier probe prefill would add
        samples.append(Sample(it, sig, nll, pnll))
    return samples


def calibrate_deployment(deployment, data: str | Path | None = None, requests: int = 256, prompt_tokens: int = 96,
                         ref_tokens: int = 32, seed: int = 1000, folds: int = 5):
    """Measure and fit on a loaded Deployment: the user's JSONL prompts (`data`) or `requests` windows
    of the demo family's held-out split. Returns (QualityFit, what it calibrated on, samples, the
    TokenStats the surprisal signal was measured with)."""
    from .calibrate import fit_quality
    from .router import AdaptiveRouter

    settings = deployment.config.policy.to_settings()
    tok = deployment.tokenizer()
    if data is not None:
        items = file_items(data, tok, prompt_tokens)
        on = f"{Path(data).name}: {len(items)} prompts (reference: each line's completion, else the top tier's)"
    else:
        items = held_out_items(tok, requests, prompt_tokens, ref_tokens, 0.5, seed)
        on = (f"demo family held-out split: {len(items)} windows of {prompt_tokens} prompt + {ref_tokens} "
              f"reference tokens (seed {seed})")
    settings.token_stats = stats = family_token_stats(tok, items if data is not None else None)
    router = AdaptiveRouter(settings)
    samples = asyncio.run(measure(deployment, router, items, ref_tokens))
    nll = {t: [s.nll[t] for s in samples] for t in samples[0].nll}
    fit = fit_quality([s.signals for s in samples], nll, folds=folds)
    return fit, on, samples, stats


def quality_yaml(fit, calibrated_on: str) -> str:
    """The `policy.quality` section for a deployment YAML (paste under `policy:`)."""
    import yaml

    from .config import QualityConfig

    q = QualityConfig.from_predictor(fit.predictor, calibrated_on, _rounded(fit.report))
    return yaml.safe_dump({"quality": _rounded(q.model_dump(exclude_none=True))}, sort_keys=False, width=100)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x
