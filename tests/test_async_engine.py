"""AsyncEngine's worker: which core steps when."""

from __future__ import annotations

import asyncio
import threading
import time

from sizewise import SamplingParams
from sizewise.engine.async_engine import AsyncEngine
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore

PROMPT = [5, 17, 33, 8, 90, 91]
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def _cores(path):
    cfg = EngineConfig(device="cpu", kv_cache_bytes=1 << 20, num_speculative_tokens=0)
    return {name: EngineCore(path, cfg, name=name) for name in ("a", "c", "b")}


def test_priority_core_with_queued_requests_steps_next(llama_dir):
    """The probe engine's queued work runs after the current step, not after the whole turn."""
    cores = _cores(llama_dir)
    order: list[str] = []
    injected: list[int] = []

    def listener(name, core, outs, dt):
        order.append(name)
        # Worker thread, between steps: queue work on idle `b` right after a step of `a`.
        if name == "a" and not injected and order.count("a") == 3:
            cores["b"].add_request("probe", PROMPT, SamplingParams(temperature=0, max_tokens=2))
            injected.append(len(order))

    engine = AsyncEngine(cores)
    engine.priority_core = "b"
    engine.step_listeners.append(listener)
    try:
        for name in ("a", "c"):
            cores[name].add_request(f"{name}-long", PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        engine._wake.set()
        deadline = time.time() + 30
        while (cores["a"].has_unfinished_requests() or cores["c"].has_unfinished_requests()) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    assert injected, order
    # Round-robin alone would step `c` next (b was idle when the turn began); priority steps `b`.
    assert order[injected[0]] == "b", order[injected[0] - 2: injected[0] + 3]


def test_probe_submitted_while_another_core_steps_is_served_in_the_next_step(llama_dir):
    """Through the public path: a probe that reaches the inbox mid-step is admitted and stepped
    straight after that step, whichever core it was and wherever it fell in the turn."""
    cores = _cores(llama_dir)
    order: list[str] = []
    marks: list[int] = []  # len(order) when a probe was queued mid-step: order[mark] steps next
    want, stepping, queued = threading.Event(), threading.Event(), threading.Event()

    def listener(name, core, outs, dt):  # runs on the worker, inside the step of `name`
        order.append(name)
        if name != "b" and want.is_set():
            want.clear()
            stepping.set()
            queued.wait(30)  # hold the step open until the probe sits in the inbox
            marks.append(len(order))

    async def main():
        engine = AsyncEngine(cores)
        engine.priority_core = "b"
        engine.step_listeners.append(listener)
        try:
            for name in ("a", "c"):
                await engine.add_request(f"{name}-long", PROMPT, LONG, core=name)
            for i in range(6):
                queued.clear()
                want.set()
                await asyncio.to_thread(stepping.wait, 30)
                stepping.clear()
                probe = asyncio.ensure_future(
                    engine.add_request(f"probe-{i}", PROMPT, SamplingParams(temperature=0, max_tokens=2), core="b"))
                await asyncio.sleep(0)  # add_request has queued it and awaits admission
                queued.set()
                async for _ in await probe:
                    pass
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert len(marks) == 6
    assert [order[m] for m in marks] == ["b"] * 6, [order[m - 1: m + 2] for m in marks]
