"""Hostile and unusual input against the server as `make serve` runs it: the demo family behind
configs/demo.yaml's adaptive router (every request is probed, pinned ones included), a real
uvicorn server, the official `openai` SDK and httpx. Bad input is a 400 naming the field, never a
500, and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from sizewise.orchestrator.deployment import Deployment, DeploymentConfig
from sizewise.orchestrator.router import AdaptiveRouter
from sizewise.server import ServerThread, create_app

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def server():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = DeploymentConfig.from_yaml(CONFIG)
    cfg = cfg.model_copy(update={"memory_fraction": 0.05,
                                 "engine": cfg.engine.model_copy(update={"max_num_seqs": 8, "max_model_len": 256})})
    dep = Deployment.load(cfg, echo_plan=False)
    assert isinstance(dep.router, AdaptiveRouter)
    try:
        with ServerThread(create_app(dep)) as url:
            yield url
    finally:
        dep.shutdown()
        torch.set_num_threads(prev)


def _still_serves(client) -> None:
    r = client.completions.create(model="auto", prompt=PROMPT, max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def _error(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    return err


# ----- token ids the tokenizer cannot decode reach the router's probe ----------------------------
@pytest.mark.parametrize("prompt", [[5, -1], [2**40], [[5, 6], [7, 2**70]]], ids=["negative", "int64", "huge"])
@pytest.mark.parametrize("model", ["auto", "small"])
def test_out_of_vocabulary_prompt_ids_are_400(client, prompt, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=prompt, max_tokens=2)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "prompt" and "vocabulary" in e.value.body["message"]
    _still_serves(client)


@pytest.mark.parametrize("ids", [[-1], [3, 2**40]])
def test_out_of_vocabulary_input_ids_are_400(http, client, ids):
    err = _error(http.post("/generate", json={"input_ids": ids, "params": {"max_tokens": 2}}), "input_ids")
    assert "vocabulary" in err["message"]
    _still_serves(client)


# ----- text that is not Unicode (a lone surrogate escape is valid JSON) -------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages"),
    ("/generate", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/tokenize", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
], ids=["completion", "completion-list", "chat", "generate", "tokenize", "tokenize-chat"])
def test_lone_surrogates_are_400(http, client, path, body, param):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    err = _error(r, param)
    assert "surrogate" in err["message"]
    _still_serves(client)


# ----- null where the OpenAI API allows null ----------------------------------------------------
def test_nullable_openai_fields_accept_null(http, client):
    r = http.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 2, "n": None,
                                           "stream": None, "echo": None, "logprobs": None, "best_of": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and not r.json()["choices"][0]["text"].startswith(PROMPT)
    r = http.post("/v1/chat/completions", json={"model": "small", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2, "n": None, "stream": None, "logprobs": None,
                                                "top_logprobs": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    chat = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          n=None, logprobs=None)
    assert len(chat.choices) == 1


# ----- errors name the field the client sent ----------------------------------------------------
def test_unavailable_strategy_names_sizewise_strategy(http):
    # demo.yaml attaches a draft model to the large tier only.
    body = {"model": "small", "sizewise": {"strategy": "draft"}}
    err = _error(http.post("/v1/completions", json={**body, "prompt": PROMPT, "max_tokens": 2}),
                 "sizewise.strategy")
    assert "draft" in err["message"]
    _error(http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]}),
           "sizewise.strategy")
    _error(http.post("/generate", json={**body, "prompt": PROMPT}), "sizewise.strategy")
    r = http.post("/v1/completions", json={**body, "model": "large", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["sizewise"]["strategy"] == "draft"


def test_chat_template_kwargs_override_like_vllm_and_reserved_keys_are_400(http):
    msgs = [{"role": "user", "content": "hi"}]
    base = {"model": "small", "messages": msgs, "max_tokens": 1}
    plain = http.post("/v1/chat/completions", json={**base, "add_generation_prompt": False})
    assert plain.status_code == 200, plain.text
    r = http.post("/v1/chat/completions", json={**base, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    for key in ("tokenize", "messages", "conversation"):
        err = _error(http.post("/v1/chat/completions", json={**base, "chat_template_kwargs": {key: True}}),
                     "chat_template_kwargs")
        assert key in err["message"]


def test_json_sent_as_a_form_says_which_content_type_to_use(http):
    # What `curl -d '{...}'` sends without -H 'Content-Type: application/json'.
    r = http.post("/v1/completions", content=b'{"model": "small", "prompt": "x", "max_tokens": 2}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    assert "application/json" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"model": "small", "prompt": "x", "max_tokens": 2}',
                  headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]


# ----- a stream carries the routing decision whole once ------------------------------------------
def _sse(lines) -> list:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def test_streams_carry_the_probe_once(http, client):
    brief_keys = {"model", "tier", "strategy", "reason"}
    body = {"prompt": PROMPT, "stream": True, "params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    with http.stream("POST", "/generate", json=body) as s:
        events = _sse(s.iter_lines())
    deltas, last = events[:-1], events[-1]
    assert len(deltas) >= 6 and "usage" in last
    assert "probe" in last["sizewise"]  # the demo's adaptive router probes every request
    # Every delta says where it went and why, the last event the whole decision as /generate answers it.
    assert all(d["sizewise"] == {k: last["sizewise"][k] for k in brief_keys} for d in deltas)
    whole = http.post("/generate", json={**body, "stream": False}).json()["sizewise"]
    assert set(whole) == set(last["sizewise"])

    chunks = list(client.completions.create(model="auto", prompt=[PROMPT, "import os\n"], max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    decisions = [c.model_extra["sizewise"] for c in chunks[:-1]]
    whole = [d for d in decisions if "probe" in d]
    assert len(whole) == 2  # each prompt's first chunk
    assert all(set(d) == brief_keys for d in decisions if "probe" not in d) and len(decisions) > 2
    as_set = lambda ds: {json.dumps(d["probe"], sort_keys=True) for d in ds}  # noqa: E731
    assert as_set(chunks[-1].model_extra["sizewise"]["prompts"]) == as_set(whole)  # the usage chunk: all of it

    chunks = list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
    decisions = [c.model_extra["sizewise"] for c in chunks]
    assert "probe" in decisions[0] and all(set(d) == brief_keys for d in decisions[1:]) and len(decisions) > 2
