"""The simulated clients' requests and their quality: per request, each tier's loss.

A workload file (JSON) holds items: the prompt's token ids, the reference continuation the
simulated runner generates, the probe model's mean prompt NLL (`difficulty`, what the real probe
measures) and each tier's mean NLL of the reference (`nll`, what quality loss is read from).
`benchmarks/routing.py` writes these for its own requests (its JSON's `items`), and
`measure_workload` measures them on a live deployment (the real models: once, offline).
The shipped `profiles/demo-workload.json` is the demo family's held-out split (96 windows of 96
prompt + 32 reference tokens, half code, seed 0, as routing.py draws them).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ..orchestrator.tiers import TIER_ORDER
from .driver import WorkItem

DEMO_WORKLOAD = Path(__file__).resolve().parent / "profiles" / "demo-workload.json"


def load_workload(path: str | Path = DEMO_WORKLOAD) -> list[WorkItem]:
    raw = json.loads(Path(path).read_text())
    items = raw["items"] if isinstance(raw, dict) else raw
    if not items:
        raise ValueError(f"{path}: no items")
    return [WorkItem(list(it["prompt"]), it.get("ref"), it.get("difficulty"), dict(it.get("nll", {}))) for it in items]


def save_workload(path: str | Path, items: list[WorkItem], source: str) -> None:
    Path(path).write_text(json.dumps({"source": source, "items": [
        {"prompt": it.prompt, "ref": it.ref, "difficulty": round(it.difficulty, 5) if it.difficulty is not None else None,
         "nll": {t: round(v, 5) for t, v in it.nll.items()}} for it in items]}) + "\n")


def measure_workload(deployment, n: int = 96, prompt_tokens: int = 96, ref_tokens: int = 32, code_frac: float = 0.5,
                     seed: int = 0) -> list[WorkItem]:
    """Each tier's NLL of the reference and the smallest tier's prompt NLL, on the real models."""
    from ..orchestrator.measure import _nll, held_out_items

    held = held_out_items(deployment.tokenizer(), n, prompt_tokens, ref_tokens, code_frac, seed)
    eng = deployment.engine
    small = deployment.tier_to_model[min(deployment.tier_to_model, key=TIER_ORDER.index)]

    async def go():
        diff = await asyncio.gather(*(_nll(eng, small, it.prompt, 1, f"w-d-{i}") for i, it in enumerate(held)))
        nll = {}
        for t, m in deployment.tier_to_model.items():
            nll[t] = await asyncio.gather(*(_nll(eng, m, it.prompt + it.ref, len(it.prompt), f"w-{t}-{i}")
                                            for i, it in enumerate(held)))
        return diff, nll

    diff, nll = asyncio.run(go())
    return [WorkItem(it.prompt, it.ref, diff[i], {t: nll[t][i] for t in nll}) for i, it in enumerate(held)]


def cycled(items: list[WorkItem], n: int) -> list[WorkItem]:
    """`n` requests from the workload's items, repeated as often as needed. A repeat's first token is
    shifted so that it shares no cached prefix with the original (the prefix cache would make it
    nearly free); its reference, difficulty and quality stay the item's."""
    out = []
    for k in range(n):
        it = items[k % len(items)]
        rep = k // len(items)
        prompt = list(it.prompt)
        if rep:
            prompt[0] = 10 + (prompt[0] + 7919 * rep) % 3000
        out.append(WorkItem(prompt, it.ref, it.difficulty, dict(it.nll)))
    return out
