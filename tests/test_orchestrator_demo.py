"""On the trained demo family (models/demo, configs/demo.yaml with its calibrated policy): an easy,
copy-like prompt goes to a cheaper tier than a hard held-out prose prompt, because the small
model (the probe) really finds the one easier than the other."""

from __future__ import annotations

from pathlib import Path

import pytest

from sizewise import SamplingParams, demo
from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.orchestrator.types import RoutingHints

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def dep():
    cfg = DeploymentConfig.from_yaml(CONFIG)
    # the demo config's own policy; a small engine footprint keeps the test lean
    cfg = cfg.model_copy(update={"memory_fraction": 0.05,
                                 "engine": cfg.engine.model_copy(update={"max_num_seqs": 8, "max_model_len": 512})})
    d = Deployment.load(cfg, echo_plan=False)
    yield d
    d.shutdown()


async def test_demo_config_routes_adaptively(dep):
    assert dep.config.policy.router == "adaptive" and isinstance(dep.router, AdaptiveRouter)
    assert set(dep.tier_to_model) == {"small", "medium", "large"}


async def test_copy_like_prompts_are_predicted_to_lose_less_than_hard_prose(dep):
    tok = dep.tokenizer()
    copy = tok.encode("import os\nimport sys\n\n\ndef main():\n    print(os.getcwd())\n" * 4, add_special_tokens=False)
    topics = demo.prose_topics()
    key = next(k for k in demo.split().held_out_prose if len(topics[k]) > 1500)
    prose = tok.encode(topics[key][:800], add_special_tokens=False)
    params = SamplingParams(max_tokens=16)
    probing = AdaptiveRouter(dep.config.policy.to_settings())
    probing.settings.always_probe = True  # measure difficulty though the idle deployment would skip it
    dc = await probing.route(dep, copy, params, "auto", RoutingHints())
    dp = await probing.route(dep, prose, params, "auto", RoutingHints())
    assert dc.probe["difficulty"] < dp.probe["difficulty"]
    assert dc.probe["copyability"] > dp.probe["copyability"]
    # the calibrated predictor expects the copy-like prompt to lose less on every smaller tier
    for t in ("small", "medium"):
        assert dc.explain["tiers"][t]["loss"] < dp.explain["tiers"][t]["loss"], (dc.to_json(), dp.to_json())
    # idle: bandwidth is free, both are served by the top tier
    assert (dc.tier, dp.tier, dp.reason) == ("large", "large", "objective:quality")
