"""What a new user following the README trips over first, answered by the server's messages."""

from __future__ import annotations

import pytest

from sizewise.orchestrator.deployment import (
    Deployment, DeploymentConfig, EngineSection, ModelEntry, StaticRouter,
)
from sizewise.server import ServerThread, create_app


@pytest.fixture(scope="module")
def server(checkpoints, one_thread):
    cfg = DeploymentConfig(models=[ModelEntry(name="tiny", tier="large", path=str(checkpoints["llama"]))],
                           device="cpu", engine=EngineSection(max_model_len=128))
    dep = Deployment.load(cfg, router=StaticRouter("large"))
    try:
        with ServerThread(create_app(dep)) as url:
            yield url
    finally:
        dep.shutdown()


def test_generate_with_sampling_fields_at_the_top_says_they_go_in_params(http):
    # The OpenAI habit: {"prompt": ..., "max_tokens": 8}. /generate wants {"params": {"max_tokens": 8}}.
    r = http.post("/generate", json={"prompt": "def add(a, b):", "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens"
    assert err["message"].startswith("unrecognized request argument supplied: max_tokens")
    assert '"params": {"max_tokens": ...}' in err["message"]
    # The shape the hint names is accepted.
    r = http.post("/generate", json={"prompt": "def add(a, b):", "params": {"max_tokens": 4, "ignore_eos": True}})
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 4


def test_other_unknown_fields_get_no_params_hint(http):
    r = http.post("/generate", json={"prompt": "x", "colour": "blue"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "unrecognized request argument supplied: colour"
    # On the OpenAI routes max_tokens is a top-level field; an unknown one there gets no /generate hint.
    r = http.post("/v1/completions", json={"model": "auto", "prompt": "x", "params": {}})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "unrecognized request argument supplied: params"
