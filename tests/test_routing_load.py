"""The fair share of device time between busy engines (the worker's `fair` discipline); the
end-to-end overload on the demo family is in test_orchestrator_demo.py."""

from __future__ import annotations

import pytest

from sizewise.engine.async_engine import FairShare


def test_fair_share_gives_busy_engines_equal_device_time():
    share = FairShare(["small", "large"])
    cost = {"small": 0.001, "large": 0.009}  # seconds per step
    steps = {"small": 0, "large": 0}
    share.wake(["small", "large"])
    for _ in range(1000):
        name = share.pick(["small", "large"])
        steps[name] += 1
        share.charge(name, cost[name])
    # equal time: the engine with 9x cheaper steps takes 9x as many (round robin would take 1:1)
    assert steps["small"] == pytest.approx(9 * steps["large"], rel=0.02)
    assert abs(share.used["small"] - share.used["large"]) <= cost["large"]


def test_an_engine_that_wakes_banks_no_credit_for_its_idle_spell():
    share = FairShare(["a", "b"])
    share.wake(["a"])
    for _ in range(100):
        share.charge(share.pick(["a"]), 0.01)
    share.wake(["a", "b"])  # b wakes after a used 1 s alone: it does not get 1 s in a row
    picks = []
    for _ in range(10):
        name = share.pick(["a", "b"])
        picks.append(name)
        share.charge(name, 0.01)
    assert picks.count("a") >= 4
