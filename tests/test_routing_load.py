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


def _turn(share: FairShare, busy: list[str], cost: dict[str, float]) -> str:
    """One turn of the worker's fair loop (AsyncEngine._run): wake the busy cores, step the one
    picked, charge its (scripted) step cost."""
    share.wake(busy)
    name = share.pick(busy)
    share.charge(name, cost[name])
    return name


def test_a_core_busy_again_after_heavy_work_is_not_starved():
    """Issue 26: after a spell of heavy work on `small` and an idle spell, a short stream on small
    waited ~6 s behind a long stream on `large`: its account still held the old work. SFQ starts a
    flow that becomes busy again at max(its own virtual time, the system's)."""
    share = FairShare(["small", "large"])
    cost = {"small": 0.001, "large": 0.009}  # scripted seconds per step
    for _ in range(2000):  # 2 s of device time on small alone
        _turn(share, ["small"], cost)
    share.idle()  # nothing to do for a while
    for _ in range(10):  # a long stream starts on large alone
        _turn(share, ["large"], cost)
    steps = {"small": 0, "large": 0}
    while steps["small"] < 32:  # then a 32-token stream on small, beside it
        steps[_turn(share, ["small", "large"], cost)] += 1
    # Equal device time: 32 small steps (32 ms) share the device with ~4 large steps (not ~220).
    assert steps["large"] <= 32 * cost["small"] / cost["large"] + 2


def test_a_core_that_rests_while_another_works_wakes_at_the_system_time():
    share = FairShare(["a", "b"])
    cost = {"a": 0.01, "b": 0.01}
    for _ in range(50):
        _turn(share, ["a", "b"], cost)
    for _ in range(100):  # b rests while a works alone: a is 1 s ahead of b's own clock
        _turn(share, ["a"], cost)
    picks = [_turn(share, ["a", "b"], cost) for _ in range(20)]
    assert 8 <= picks.count("b") <= 12  # b shares from now on, without a 1 s catch-up run
