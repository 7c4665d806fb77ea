"""Reliability (issue 26): no request can exhaust the server. Run against the demo family on a real
uvicorn server with httpx and raw sockets on loopback; every check is of behaviour (status, the
limit named, which connection was closed), never of a duration."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.server import ServerThread, create_app

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def deployment():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = DeploymentConfig.from_yaml(CONFIG)
    cfg = cfg.model_copy(update={"memory_fraction": 0.05, "engine": cfg.engine.model_copy(
        update={"max_num_seqs": 8, "max_model_len": MAX_MODEL_LEN})})
    dep = Deployment.load(cfg, echo_plan=False)
    try:
        yield dep
    finally:
        dep.shutdown()
        torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def server(deployment):
    with ServerThread(create_app(deployment)) as url:
        yield url


# ----- 1: a prompt too long to fit is refused by its length in characters, before tokenizing ------
@pytest.fixture(scope="module")
def char_limit(deployment) -> int:
    # The reference: the tokenizer's longest vocabulary entry bounds the characters of one token.
    vocab = deployment.tokenizer().get_vocab()
    return MAX_MODEL_LEN * max(len(t) for t in vocab)


def _refused(r: httpx.Response, param: str, limit: int) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param, err
    assert f"limit of {limit} characters" in err["message"], err


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", lambda t: {"prompt": t, "max_tokens": 4}, "prompt"),
    ("/v1/completions", lambda t: {"prompt": ["hi", t], "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}], "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t[: len(t) // 2]}] * 2 + [
        {"role": "user", "content": [{"type": "text", "text": "x"}]}], "max_tokens": 4}, "messages"),
    ("/generate", lambda t: {"prompt": t, "params": {"max_tokens": 4}}, "prompt"),
    ("/tokenize", lambda t: {"prompt": t}, "prompt"),
    ("/tokenize", lambda t: {"messages": [{"role": "user", "content": t}]}, "messages"),
])
def test_text_longer_than_any_context_is_refused_naming_the_character_limit(http, deployment, char_limit,
                                                                             path, body, param):
    text = "y " * (char_limit // 2 + 1)  # just over the limit: ~limit/2 tokens, far over the context
    assert len(deployment.tokenizer().encode(text)) > MAX_MODEL_LEN  # so it could never have been served
    _refused(http.post(path, json=body(text)), param, char_limit)


def test_a_huge_prompt_is_refused_without_being_tokenized(http, char_limit):
    """A 4 MB prompt: main tokenized it whole (seconds, gigabytes for 50 MB) before its length was
    checked. The message names the character count only the pre-tokenizing check knows."""
    text = "y " * 2_000_000
    r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 4})
    _refused(r, "prompt", char_limit)
    assert f"has {len(text)} characters" in r.json()["error"]["message"]


def test_text_within_the_character_limit_is_still_served(http, deployment):
    ok = http.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    # long in characters but few tokens (runs of spaces merge): under the bound, so it is tokenized and served
    text = "x" + " " * 40 * 100
    n = len(deployment.tokenizer().encode(text))
    assert len(text) > MAX_MODEL_LEN and n < MAX_MODEL_LEN
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200 and r.json()["count"] == n


def test_detokenize_is_bounded_by_the_context(http):
    r = http.post("/detokenize", json={"tokens": [5] * (MAX_MODEL_LEN + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    assert str(MAX_MODEL_LEN) in r.json()["error"]["message"]
