"""Calibration as users run it: `sizewise calibrate` on the demo family with their own prompts
(JSONL), the YAML it prints round-trips into a deployment and names the text it was fitted on; bad
calibration files are refused naming the line; a deployment warns about fits for tiers it lacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sizewise import demo
from sizewise.cli import main
from sizewise.orchestrator.config import PolicyConfig, QualityConfig
from sizewise.orchestrator.deployment import DeploymentConfig
from sizewise.orchestrator.measure import file_items
from sizewise.orchestrator.policy import QualityPredictor, TierFit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture
def small_demo_config(tmp_path) -> Path:
    raw = yaml.safe_load(CONFIG.read_text())
    for m in raw["models"]:
        m["path"] = str((CONFIG.parent / m["path"]).resolve())
    if raw["policy"].get("token_stats"):
        raw["policy"]["token_stats"] = str((CONFIG.parent / raw["policy"]["token_stats"]).resolve())
    raw["memory_fraction"] = 0.05
    raw["engine"].update(max_num_seqs=8, max_model_len=256)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_calibrate_on_a_users_prompts_prints_a_predictor_that_round_trips(small_demo_config, tmp_path, capsys):
    s = demo.split()
    texts = [demo.read_code(r) for r in s.held_out_code[:8]] + [demo.prose_topics()[k] for k in s.held_out_prose[:8]]
    data = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": w}) for t in texts for i in range(2) if (w := t[i * 300:(i + 1) * 300]).strip()]
    lines[0] = json.dumps({"prompt": texts[0][:300], "completion": texts[0][300:420]})  # with its own reference
    data.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "quality.yaml"
    assert main(["calibrate", "--config", str(small_demo_config), "--calibration-data", str(data),
                 "--ref-tokens", "8", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "calibrating on " + str(data) in cap.err and "prompts.jsonl" in cap.err
    # a few dozen prompts for ~10 candidate signals: said plainly
    assert re.search(rf"warning: fitted on {len(lines)} prompts while choosing among \d+ signals", cap.err), cap.err
    section = yaml.safe_load(out.read_text())["quality"]
    assert section["calibrated_on"].startswith(f"prompts.jsonl: {len(lines)} prompts")
    q = PolicyConfig.model_validate({"router": "adaptive", "quality": section}).quality
    assert set(q.tiers) == {"small", "medium"}
    assert all(f.mean >= 0 for f in q.tiers.values())
    assert set(section["report"]["single"]) >= {"difficulty", "surprisal", "copyability", "prompt_gap"}
    assert "quality:" in cap.out
    # the surprisal signal's token statistics: written next to the config, named in the YAML, loadable
    stats = small_demo_config.with_name("demo.tokens.json")
    assert yaml.safe_load(out.read_text())["token_stats"] == stats.name and stats.exists()
    from sizewise.orchestrator.probe import TokenStats

    ts = TokenStats.from_json(json.loads(stats.read_text()))
    assert ts.tokens > 0 and ts.surprisal([1, 2, 3]) > 0


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "def add(a, b): return a + b"}\nnot json\n', r"prompts.jsonl:2: not JSON"),
    ('{"text": "no prompt key"}\n', r"prompts.jsonl:1: each line needs a non-empty string `prompt`"),
    ('{"prompt": "fine", "completion": 5}\n', r"prompts.jsonl:1: `completion` must be a string"),
    ('\n\n', r"no prompts"),
])
def test_bad_calibration_files_are_refused_naming_the_line(tmp_path, text, match):
    from sizewise.engine.core import load_tokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        file_items(path, load_tokenizer(demo.demo_model_path("small")), 96)
    with pytest.raises(ValueError, match="cannot read calibration data"):
        file_items(tmp_path / "missing.jsonl", load_tokenizer(demo.demo_model_path("small")), 96)


def test_calibrate_cli_error_is_one_line(small_demo_config, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("nope\n")
    assert main(["calibrate", "--config", str(small_demo_config), "--calibration-data", str(bad)]) == 2
    assert "prompts.jsonl:1: not JSON" in capsys.readouterr().err


def test_a_two_tier_deployment_warns_about_fits_for_tiers_it_lacks():
    pred = QualityPredictor({"small": TierFit(0.3, {}, 0.3), "medium": TierFit(0.2, {}, 0.2)})
    cfg = DeploymentConfig.model_validate({
        "models": [{"name": "s", "tier": "small", "path": "x"}, {"name": "l", "tier": "large", "path": "y"}],
        "policy": {"router": "adaptive", "quality": QualityConfig.from_predictor(pred).model_dump()}})
    (w,) = cfg.policy_warnings()
    assert "policy.quality.tiers.medium" in w and "no medium tier" in w
    top = DeploymentConfig.model_validate({
        "models": [{"name": "s", "tier": "small", "path": "x"}, {"name": "m", "tier": "medium", "path": "y"}],
        "policy": {"router": "adaptive", "quality": QualityConfig.from_predictor(pred).model_dump()}})
    (w,) = top.policy_warnings()
    assert "medium is this deployment's top tier" in w
