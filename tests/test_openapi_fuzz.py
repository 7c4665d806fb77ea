"""/openapi.json documents every request as it is validated: schemathesis (its CLI, the `test` extra)
generates requests from it (bounded examples, fixed seed, loopback, the demo family's small model at
a short context) and every answer must be no 5xx, with a documented status, content type, headers and
body, and requests the schema calls invalid must be refused (issue 26)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.server import ServerThread, create_app

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def api_url():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = DeploymentConfig.from_yaml(CONFIG)
    cfg = cfg.model_copy(update={"memory_fraction": 0.05, "models": [m for m in cfg.models if m.tier == "small"],
                                 "engine": cfg.engine.model_copy(update={"max_num_seqs": 8, "max_model_len": 64})})
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        with ServerThread(create_app(deployment=dep)) as url:
            yield url
    finally:
        dep.shutdown()
        torch.set_num_threads(prev)


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


def test_openapi_documents_the_limits_and_hints_as_validated(api_url):
    import httpx

    from sizewise.server import protocol as P

    spec = httpx.get(api_url + "/openapi.json").json()
    defs = spec["components"]["schemas"]
    prompt = defs["CompletionRequest"]["properties"]["prompt"]
    assert {"type": "string"} in prompt["anyOf"]
    assert any(s.get("maxItems") == P.MAX_PROMPTS for s in prompt["anyOf"])  # the 128-prompt bound
    assert defs["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == P.MAX_MESSAGES
    assert "anyOf" in defs["ChatMessage"]["properties"]["content"]  # text or text parts, nothing else
    hints = defs["SizewiseOptions"]["properties"]
    assert hints["strategy"]["enum"] == ["auto", "plain", "pld", "draft"]
    assert {"exclusiveMinimum": 0, "type": "number"} in hints["max_latency_ms"]["anyOf"]
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}  # stream: true answers SSE
    assert "security" not in spec["paths"]["/v1/completions"]["post"]  # no key configured: none required


def test_generated_requests_get_no_5xx_and_documented_answers(api_url, tmp_path):
    cmd = [*schemathesis_cli(), "run", f"{api_url}/openapi.json", "--max-examples", "20", "--seed", "26",
           "--phases", "examples,coverage,fuzzing", # Every check but positive_data_acceptance: a schema cannot say everything a valid request
           # needs (exactly one of prompt/messages, a prompt that fits the context, max_tokens 0
           # only with echo), and those are refused with a 400 naming the parameter.
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--request-timeout", "120",
           "--no-color", "--continue-on-failure"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-12000:] + p.stderr[-3000:]
