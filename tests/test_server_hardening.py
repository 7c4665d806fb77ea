"""Hardening (issue 16): no request can freeze, starve or exhaust the server. Run against the demo
family behind configs/demo.yaml on a real uvicorn server, with httpx, raw sockets and the official
`openai` SDK. Every check is of behaviour (status, error field, socket option, which request
answered first), never of a duration."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from sizewise.orchestrator.deployment import ServerSection
from sizewise.server import ServerThread, create_app

from conftest import demo_deployment

PROMPT = "def add(a, b):"
MSGS = [{"role": "user", "content": "hi"}]
# Runs ~10^10 template steps: minutes on the event loop if nothing bounds it.
ENDLESS_TEMPLATE = ("{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% for c in l %}"
                    "{% endfor %}{% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def deployment():
    with demo_deployment(max_num_seqs=8, max_model_len=256) as dep:
        yield dep


@pytest.fixture(scope="module")
def server(deployment):
    with ServerThread(create_app(deployment)) as url:
        yield url


def _error(r: httpx.Response, param: str | None, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


# ----- 1: a request-supplied chat template ---------------------------------------------------------
def test_request_chat_template_is_refused_naming_the_field(http):
    body = {"model": "small", "messages": MSGS, "max_tokens": 1,
            "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}
    err = _error(http.post("/v1/chat/completions", json=body), "chat_template_kwargs.chat_template")
    assert "--trust-request-chat-template" in err["message"]
    ok = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"add_generation_prompt": True}})
    assert ok.status_code == 200, ok.text


def test_trusted_request_template_renders_off_the_loop_and_is_bounded(deployment):
    cfg = ServerSection(trust_request_chat_template=True, chat_template_timeout_s=5.0)
    body = {"model": "small", "messages": MSGS, "max_tokens": 1}
    with ServerThread(create_app(deployment, cfg)) as url, httpx.Client(base_url=url, timeout=120) as http:
        r = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"chat_template": "Q{{ 1 }}A"}})
        assert r.status_code == 200, r.text  # trusted: the request's own template is used
        assert r.json()["usage"]["prompt_tokens"] == len(deployment.tokenizer("small").encode(
            "Q1A", add_special_tokens=False))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hostile = pool.submit(http.post, "/v1/chat/completions",
                                  json={**body, "chat_template_kwargs": {"chat_template": ENDLESS_TEMPLATE}})
            with httpx.Client(base_url=url, timeout=120) as other:
                assert other.get("/health").status_code == 200
                assert not hostile.done()  # /health answered while the template was still running
            err = _error(hostile.result(), "messages")
        assert "did not render within" in err["message"] and "5 s" in err["message"]


# ----- 2: Nagle's algorithm on accepted connections -----------------------------------------------
def test_accepted_connections_set_tcp_nodelay(deployment):
    """Two requests on one kept-alive connection: with Nagle on, the second small response waits for
    the client's delayed ACK (~40 ms). What prevents it is TCP_NODELAY on the server's side of the
    connection, read here from the socket uvicorn accepted."""
    import socket

    st = ServerThread(create_app(deployment))
    with st as url, httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(2):
            assert http.get("/health").status_code == 200
        conns = list(st.server.server_state.connections)
        assert len(conns) == 1  # both requests came over one connection
        sock = conns[0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# ----- 3: every list-valued parameter is bounded ---------------------------------------------------
@pytest.mark.parametrize("path,extra,param,limit", [
    ("/v1/completions", {"stop_token_ids": list(range(1025))}, "stop_token_ids", "1024"),
    ("/v1/completions", {"stop": [f"s{i}" for i in range(17)]}, "stop", "16"),
    ("/v1/completions", {"stop": ["x" * 1025]}, "stop", "1024"),
    ("/v1/completions", {"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias", "300"),
    ("/v1/completions", {"prompt": ["a"] * 129}, "prompt", "128"),
    ("/v1/chat/completions", {"messages": MSGS * 1025}, "messages", "1024"),
    ("/v1/chat/completions", {"stop_token_ids": list(range(1025))}, "stop_token_ids", "1024"),
    ("/generate", {"params": {"stop_token_ids": list(range(1025))}}, "params.stop_token_ids", "1024"),
    ("/generate", {"params": {"stop": ["a"] * 17}}, "params.stop", "16"),
    ("/tokenize", {"messages": MSGS * 1025, "prompt": None}, "messages", "1024"),
], ids=["stop-ids", "stop", "stop-length", "logit-bias", "prompts", "messages", "chat-stop-ids", "generate-stop-ids",
        "generate-stop", "tokenize-messages"])
def test_list_parameters_over_their_limit_are_400_naming_it(http, path, extra, param, limit):
    body = {"model": "small", "max_tokens": 2, "prompt": PROMPT, "messages": MSGS}
    body = {k: v for k, v in body.items() if k != ("prompt" if "chat" in path else "messages")}
    if path == "/generate":
        body = {"model": "small", "prompt": PROMPT}
    if path == "/tokenize":
        body = {"model": "small"}
    body.update(extra)
    body = {k: v for k, v in body.items() if v is not None}
    err = _error(http.post(path, json=body), param)
    assert limit in err["message"], err


def test_largest_stop_list_is_served_and_its_ids_stop_generation(http, deployment):
    """1024 stop ids (the limit) are accepted and honoured: the greedy continuation stops at the
    first generated token that is in the list, with that token as stop_reason."""
    params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    free = http.post("/generate", json={"model": "small", "prompt": PROMPT, "params": params}).json()
    first, second, target = free["token_ids"][:3]
    others = [t for t in range(deployment.cores["demo-small"].vocab_size) if t not in (first, second, target)]
    stop = [*others[:1023], target]
    r = http.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True, "stop_token_ids": stop})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == target


def test_sampling_params_bound_their_lists():
    from sizewise import InvalidRequestError, SamplingParams

    SamplingParams(stop_token_ids=list(range(SamplingParams.MAX_STOP_TOKEN_IDS)))
    with pytest.raises(InvalidRequestError, match="at most 1024") as e:
        SamplingParams(stop_token_ids=list(range(SamplingParams.MAX_STOP_TOKEN_IDS + 1)))
    assert e.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError, match="1024 characters") as e:
        SamplingParams(stop=["x" * (SamplingParams.MAX_STOP_CHARS + 1)])
    assert e.value.param == "stop"


# ----- 7: wrong types are refused, not coerced -----------------------------------------------------
@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "max_tokens", True), ("/v1/completions", "n", "2"), ("/v1/completions", "stream", "yes"),
    ("/v1/completions", "temperature", "0"), ("/v1/completions", "max_tokens", 4.0),
    ("/v1/completions", "echo", 1), ("/v1/completions", "seed", "1"),
    ("/v1/chat/completions", "max_tokens", True), ("/v1/chat/completions", "logprobs", "true"),
    ("/v1/chat/completions", "stream_options", {"include_usage": "yes"}),
    ("/generate", "params", {"max_tokens": 2.0}), ("/generate", "stream", 1),
    ("/tokenize", "add_special_tokens", "no"), ("/detokenize", "tokens", ["1", "2"]),
])
def test_wrong_types_are_400_naming_the_parameter(http, path, field, value):
    body = {"/v1/completions": {"prompt": PROMPT, "max_tokens": 2}, "/v1/chat/completions": {"messages": MSGS},
            "/generate": {"prompt": PROMPT}, "/tokenize": {"prompt": PROMPT}, "/detokenize": {"tokens": [1]}}[path]
    r = http.post(path, json={"model": "small", **body, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(field), r.json()


def test_openai_sdk_nulls_and_numbers_still_pass(client, http):
    r = http.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": None, "n": None,
                                           "temperature": 0, "top_p": 1, "stream": None, "seed": None})
    assert r.status_code == 200, r.text  # an integer is a valid float; null is the default
    out = client.completions.create(model="small", prompt=PROMPT, max_tokens=2, temperature=0.0, top_p=None,
                                    stream_options=None, logprobs=None)
    assert out.choices[0].finish_reason in ("length", "stop")


# ----- 9: exposure ---------------------------------------------------------------------------------
def test_models_list_names_not_filesystem_paths(http, deployment):
    cards = http.get("/v1/models").json()["data"]
    dirs = [str(c.model_dir) for c in deployment.cores.values()]
    for card in cards:
        assert not any(d in str(v) for v in card.values() for d in dirs), card
    assert {c["root"] for c in cards if c["sizewise"]["kind"] == "model"} == set(deployment.cores)


def test_echoed_input_is_truncated(http):
    huge = "m" * (1 << 20)
    r = http.post("/v1/completions", json={"model": huge, "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert len(r.text) < 2000 and "mmm..." in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": PROMPT, huge: 1})
    assert r.status_code == 400 and len(r.text) < 2000, r.text[:200]


def test_metrics_auth_flag_requires_a_key(capsys, monkeypatch):
    from sizewise.cli import main

    monkeypatch.delenv("SIZEWISE_API_KEYS", raising=False)
    assert main(["serve", "--metrics-auth", "--port", "0"]) == 2
    assert "--metrics-auth needs an API key" in capsys.readouterr().err


# ----- 10: a web page cannot drive a local server -------------------------------------------------
def test_body_without_json_content_type_is_400(http):
    raw = b'{"model": "small", "prompt": "x", "max_tokens": 2}'
    for headers in ({}, {"content-type": "text/plain"}):
        r = http.post("/v1/completions", content=raw, headers=headers)
        assert r.status_code == 400 and "application/json" in r.json()["error"]["message"], r.text
    assert http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("localhost:8000", True), ("[::1]:80", True),
                                     ("attacker.example:8000", False), ("10.0.0.1", False)])
def test_loopback_server_checks_the_host_header(http, host, ok):
    r = http.get("/health", headers={"host": host})
    assert (r.status_code == 200) == ok, r.text
    if not ok:
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_server_bound_to_all_interfaces_takes_any_host(deployment):
    with ServerThread(create_app(deployment, ServerSection(host="0.0.0.0"))) as url:
        assert httpx.get(url + "/health", headers={"host": "sizewise.internal"}).status_code == 200
