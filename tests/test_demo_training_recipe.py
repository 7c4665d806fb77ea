"""The demo family's training script (scripts/train_demo_family.py): the copy documents of the
gpu-copy recipe copy what they show, come from the training split only, and the held-out copy
evaluation reads held-out files only (a leak would make the card's copy NLL meaningless)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from sizewise import demo

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_family.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_demo_family", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_copy_documents_repeat_their_first_half_from_training_files_only(train):
    split = demo.split()
    code = [(rel, demo.read_code(rel) or "") for rel in split.train_code[:60]]
    topics = demo.prose_topics()
    prose = [topics[k] for k in split.train_prose[:20]]
    docs = train.copy_documents(code, prose, 40, seed=0)
    assert len(docs) == 40 and docs == train.copy_documents(code, prose, 40, seed=0)  # seeded
    train_paths, held_out = set(split.train_code), set(split.held_out_code)
    kinds = set()
    for d in docs:
        renamed = re.search(r"`(\w+)` (?:renamed to|is now called) `(\w+)`|Rename `(\w+)` to `(\w+)`|renamed (\w+) -> (\w+)", d)
        if renamed:  # edit-code: every line of the shown chunk comes back, with the name replaced
            kinds.add("edit")
            old, new = [g for g in renamed.groups() if g]
            lines = [ln for ln in d.split("\n") if ln.strip()]
            shown = [ln for ln in lines if re.search(r"\b%s\b" % re.escape(old), ln) and "renamed" not in ln
                     and "Rename" not in ln and "called" not in ln]
            assert shown and all(re.sub(r"\b%s\b" % re.escape(old), new, ln) in d for ln in shown)
            for path in re.findall(r"^# (\S+\.py)$|from (\S+\.py):", d, re.M):
                p = next(x for x in path if x)
                assert p in train_paths and p not in held_out
        else:  # quote: the passage appears twice
            kinds.add("quote")
            head = d.split("\n")[0] if not d.startswith("Passage:") else d.split("\n")[1]
            assert d.count(head[:80]) >= 2
    assert kinds == {"edit", "quote"}


def test_held_out_copy_eval_reads_held_out_files_only(train):
    pairs = train.held_out_copy_pairs(8)
    held_out = set(demo.split().held_out_code)
    assert len(pairs) == 8
    for prefix, copy in pairs:
        path = prefix.split("\n", 1)[0].removeprefix("# ")
        assert path in held_out
        old, new = re.search(r"`(\w+)` renamed to `(\w+)`", prefix).groups()
        assert new == old + "_v2" and copy == re.sub(r"\b%s\b" % re.escape(old), new, copy.replace(new, old))
        assert copy.replace(new, old) in prefix  # the copy is the shown function, renamed


def test_recipes_scale_budgets_and_keep_the_cpu_recipe(train):
    before = {t: dict(v) for t, v in train.TIERS.items()}
    try:
        rec = train.apply_recipe("gpu-copy", steps_scale=0.01)
        assert rec["copy_docs"] > 0
        for t, spec in train.TIERS.items():
            assert spec["steps"] == round(train.RECIPES["gpu-copy"]["steps"][t] * 0.01)
            assert spec["tokens"] == spec["steps"] * spec["batch_size"] * train.SEQ_LEN + \
                spec["phase2_steps"] * train.PHASE2["batch_size"] * train.PHASE2["seq_len"]
    finally:
        for t, v in before.items():
            train.TIERS[t].clear()
            train.TIERS[t].update(v)
    train.apply_recipe("cpu")
    assert {t: (v["steps"], v["batch_size"]) for t, v in train.TIERS.items()} == \
        {t: (v["steps"], v["batch_size"]) for t, v in before.items()}


def test_synthetic_repeat_rows_are_periodic_seeded_and_spare_the_rest(train):
    import torch

    x = torch.arange(64 * 256).reshape(64, 256) % 4000 + 5
    a = train.with_synthetic_repeats(x, step=7, frac=0.25, vocab=train.VOCAB_SIZE)
    assert torch.equal(a, train.with_synthetic_repeats(x, step=7, frac=0.25, vocab=train.VOCAB_SIZE))
    changed = [i for i in range(64) if not torch.equal(a[i], x[i])]
    assert 6 <= len(changed) <= 28  # ~16 of 64
    for i in changed:
        row = a[i].tolist()
        period = next(p for p in range(8, 129) if all(row[j] == row[j % p] for j in range(256)))
        assert 8 <= period <= 128 and min(row) >= len(train.SPECIAL_TOKENS) and max(row) < train.VOCAB_SIZE
    assert torch.equal(train.with_synthetic_repeats(x, step=7, frac=0.0, vocab=train.VOCAB_SIZE), x)


def test_time_budget_shortens_every_stage_to_fit_and_leaves_a_fitting_plan_alone(train):
    def plan():
        return [dict(steps=1000, batch_size=8, seq_len=256), dict(steps=100, batch_size=1, seq_len=1024)]

    # 60 steps done in 6 s at 0.1 s/step: the whole plan needs ~6 + 94 + 5 = 105 s.
    p = plan()
    assert train.fit_time_budget(p, 60, 6.0, 0.1, budget_s=200) == 1.0 and p == plan()
    p = plan()
    scale = train.fit_time_budget(p, 60, 6.0, 0.1, budget_s=50)
    assert 0.4 < scale < 0.5
    per_token = 0.1 / (8 * 256)
    projected = 6.0 + per_token * (sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in p) - 60 * 8 * 256)
    assert projected <= 50 and p[1]["steps"] < 100 and p[0]["steps"] > 60
    # Over budget already: stop right after the steps taken, keep at least one step per stage.
    p = plan()
    train.fit_time_budget(p, 60, 60.0, 0.1, budget_s=50)
    assert p[0]["steps"] == 61 and p[1]["steps"] >= 1
