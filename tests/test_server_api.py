"""The HTTP gateway end to end: a real uvicorn server on 127.0.0.1 in front of a two-tier
Deployment of tiny checkpoints. Clients are the official `openai` SDK and httpx; the numerical
reference is transformers itself (its log-softmax and greedy argmax on the same weights)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from sizewise.orchestrator.deployment import (
    Deployment, DeploymentConfig, EngineSection, ModelEntry, ServerSection, StaticRouter,
)
from sizewise.server import ServerThread, create_app

MAX_LEN = 512  # the tiny checkpoints' max_position_embeddings
LONG = MAX_LEN - 32  # max_tokens of a request meant to outlive the test's patience
PROMPT = "def add(a, b):"


def _config(checkpoints, tiers=("small", "large"), **engine) -> DeploymentConfig:
    paths = {"small": checkpoints["llama"], "large": checkpoints["llama_tied_linear"]}  # one tokenizer
    return DeploymentConfig(
        models=[ModelEntry(name=f"tiny-{t}", tier=t, path=str(paths[t])) for t in tiers],
        device="cpu", engine=EngineSection(max_model_len=MAX_LEN, **engine),
    )


def _load(cfg: DeploymentConfig) -> Deployment:
    # `auto` pinned to one tier: these tests are about the gateway, not the adaptive policy.
    return Deployment.load(cfg, router=StaticRouter(cfg.models[-1].tier))


@pytest.fixture(scope="module")
def deployment(checkpoints, one_thread):
    dep = _load(_config(checkpoints))
    yield dep
    dep.shutdown()


@pytest.fixture(scope="module")
def server(deployment):
    with ServerThread(create_app(deployment)) as url:
        yield url


@pytest.fixture(scope="module")
def tok(checkpoints):
    return transformers.AutoTokenizer.from_pretrained(str(checkpoints["llama"]))


@pytest.fixture(scope="module")
def hf(checkpoints):
    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    return {"small": load(checkpoints["llama"]), "large": load(checkpoints["llama_tied_linear"])}


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@torch.no_grad()
def hf_greedy(model, ids: list[int], k: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(k):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def wait_idle(dep: Deployment, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = dep.engine.stats()
        if all(s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0 for s in stats.values()):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy after {timeout} s: {stats}")
        time.sleep(0.01)


def sse_events(lines) -> list:
    """`data: ...` lines of a Server-Sent Events body -> parsed JSON objects ("[DONE]" kept as is)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ----- OpenAI SDK ---------------------------------------------------------------------------
def test_completion_echo_logprobs_match_transformers(client, tok, hf):
    ids = tok.encode(PROMPT)
    gen = hf_greedy(hf["small"], ids, 6)
    r = client.completions.create(model="small", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  echo=True, extra_body={"ignore_eos": True})
    assert r.model == "tiny-small"
    assert r.model_extra["sizewise"]["tier"] == "small" and r.model_extra["sizewise"]["reason"] == "pinned"
    ch = r.choices[0]
    assert ch.finish_reason == "length"
    assert ch.text == PROMPT + tok.decode(gen)
    lp = ch.logprobs
    full = ids + gen
    assert lp.tokens == [tok.decode([t]) for t in full]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:] == pytest.approx(hf_logprobs(hf["small"], full), abs=2e-3)
    for pos in range(len(ids), len(full)):  # generated greedily: the chosen token is the top one
        top = lp.top_logprobs[pos]
        assert 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(lp.token_logprobs[pos], abs=1e-5)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == len(ids) + 6


def test_echo_scoring_with_max_tokens_zero(client, tok, hf):
    """What scoring clients send: echo + logprobs + max_tokens=0 returns only the prompt's logprobs."""
    ids = tok.encode(PROMPT)
    r = client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert r.model == "tiny-large"  # pinned by model name
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(hf_logprobs(hf["large"], ids), abs=2e-3)
    assert r.usage.completion_tokens == 0


def test_chat_matches_completion_of_rendered_template(client, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add two numbers"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = client.chat.completions.create(model="large", messages=messages, max_completion_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    comp = client.completions.create(model="large", prompt=rendered, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy
    assert "".join(e.token for e in content) == msg.content


def test_streams_concatenate_to_the_non_streamed_text(client):
    kw = dict(model="auto", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    plain = client.completions.with_raw_response.create(**kw)
    assert plain.headers["x-sizewise-tier"] == "large"
    whole = plain.parse()
    raw = client.completions.with_raw_response.create(**kw, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-sizewise-tier"] == "large"  # static router: auto -> large
    chunks = list(raw.parse())
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    texts = [c.choices[0].text for c in chunks[:-1]]
    assert "".join(texts) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.model_extra["sizewise"]["tier"] == "large" for c in chunks)

    messages = [{"role": "user", "content": "count"}]
    kw = dict(model="small", messages=messages, max_tokens=10, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_n_and_prompt_lists_are_indexed_prompt_major(client, tok):
    prompts = [PROMPT, "import os\n"]
    kw = dict(model="small", n=2, max_tokens=6, temperature=1.0, seed=11, echo=True)
    r = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(prompts[c.index // 2]) for c in r.choices)
    alone = client.completions.create(prompt=prompts[1], **kw)
    assert [c.text for c in alone.choices] == [c.text for c in r.choices[2:]]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)  # once per prompt, not per n
    assert r.usage.completion_tokens == alone.usage.completion_tokens + client.completions.create(
        prompt=prompts[0], **kw).usage.completion_tokens


def test_same_seed_same_text(client):
    kw = dict(model="large", prompt="The quick brown fox", max_tokens=12, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_stop_string_ends_the_text(client):
    kw = dict(model="small", prompt="The quick brown fox", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    # A two-character ASCII piece of the greedy text (after its first character) as the stop string.
    stop = next((full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].isascii()
                 and full[i:i + 2].isalnum()), None)
    assert stop is not None, f"the greedy text {full!r} has no ASCII pair to stop on"
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop


def test_errors_are_the_sdks_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="small", prompt=PROMPT, temperature=-1)
    assert e.value.param == "temperature" and e.value.status_code == 400
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 80
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="small", prompt=long_prompt)
    assert e.value.param == "prompt" and str(MAX_LEN) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                       top_logprobs=3)  # without logprobs=True
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert "no-such-model" in e.value.message


def test_context_length_error_states_both_counts(http, tok):
    # Over the context in tokens but under the character bound (512 tokens x 7 characters at most
    # per token of this tokenizer), which a longer text would meet first (its message: characters).
    text = "The quick brown fox jumps over the lazy dog. " * 60
    n = len(tok.encode(text))
    assert n >= MAX_LEN
    r = http.post("/v1/completions", json={"model": "small", "prompt": text, "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt"
    assert str(n) in err["message"] and str(MAX_LEN) in err["message"]
    r = http.post("/v1/completions", json={"model": "small", "prompt": "hello", "max_tokens": MAX_LEN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert str(MAX_LEN) in r.json()["error"]["message"]


def test_long_prompts_are_tokenized_off_the_event_loop(http, tok, deployment, monkeypatch):
    """A long text is tokenized in a worker thread (the event loop keeps serving the other
    streams meanwhile); a short one on the loop. Same tokens either way, same errors."""
    from sizewise.server import serving

    # This tokenizer's character bound (512 tokens x 7 characters) is below the real threshold: lower it.
    monkeypatch.setattr(serving, "OFFLOAD_CHARS", 1024)
    OFFLOAD_CHARS = serving.OFFLOAD_CHARS
    hf_tok = deployment.tokenizer("tiny-small")
    threads: list[str] = []
    real_encode = hf_tok.encode

    def recording_encode(*a, **kw):
        threads.append(threading.current_thread().name)
        return real_encode(*a, **kw)

    monkeypatch.setattr(hf_tok, "encode", recording_encode)
    short = http.post("/tokenize", json={"prompt": PROMPT, "model": "small"}).json()
    long_text = "x = 1  # filler\n" * (OFFLOAD_CHARS // 16 + 64)
    assert len(long_text) > OFFLOAD_CHARS
    longr = http.post("/tokenize", json={"prompt": long_text, "model": "small"}).json()
    assert short["tokens"] == tok.encode(PROMPT) and longr["tokens"] == tok.encode(long_text)
    assert len(threads) == 2 and threads[0] != threads[1]
    # a long prompt past the context still gets the clear 400, from the worker thread
    r = http.post("/v1/completions", json={"model": "small", "prompt": long_text, "max_tokens": 4})
    assert r.status_code == 400 and str(longr["count"]) in r.json()["error"]["message"]
    assert threads[-1] == threads[1]
    r = http.post("/v1/chat/completions", json={"model": "small", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and threads[-1] != threads[0]


def test_api_keys_from_config_and_env(deployment, monkeypatch):
    monkeypatch.setenv("SIZEWISE_API_KEYS", "env-key, other-key")
    open_app = create_app(deployment, ServerSection(api_keys=["cfg-key"]))
    locked_app = create_app(deployment, ServerSection(api_keys=["cfg-key"], metrics_require_auth=True))
    with ServerThread(open_app) as url, ServerThread(locked_app) as locked_url, httpx.Client(timeout=30) as h:
        for key in ("cfg-key", "env-key", "other-key"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert {m.id for m in c.models.list()} >= {"small", "large", "auto"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = h.post(url + "/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 401 and r.json()["error"]["type"]
        assert h.post(url + "/generate", json={"prompt": PROMPT}).status_code == 401
        assert h.get(url + "/health").status_code == 200
        assert h.get(url + "/metrics").status_code == 200
        assert h.get(locked_url + "/metrics").status_code == 401
        assert h.get(locked_url + "/metrics", headers={"Authorization": "Bearer env-key"}).status_code == 200


def test_full_queue_is_429_with_retry_after(checkpoints, one_thread):
    dep = _load(_config(checkpoints, tiers=("small",), max_num_seqs=1, max_waiting=1))
    try:
        with ServerThread(create_app(dep)) as url, httpx.Client(base_url=url, timeout=60) as h:
            body = {"model": "small", "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as running:
                assert running.status_code == 200  # admitted, first in line: it takes the only slot
                waiting: dict = {}
                t = threading.Thread(target=lambda: waiting.setdefault("r", h.post(
                    "/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 2})))
                t.start()
                deadline = time.monotonic() + 20
                while not (dep.engine.stats()["tiny-small"].num_waiting == 1
                           and dep.engine.stats()["tiny-small"].num_running == 1):
                    assert time.monotonic() < deadline, "the second request never queued"
                    time.sleep(0.002)
                c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model="small", prompt=PROMPT, max_tokens=2)
                assert int(e.value.response.headers["retry-after"]) >= 1
            t.join(60)  # the stream was closed (aborted): the queued request runs and succeeds
            assert waiting["r"].status_code == 200
            assert waiting["r"].json()["usage"]["completion_tokens"] >= 1
        wait_idle(dep)
    finally:
        dep.shutdown()


# ----- native API, tokenizer endpoints, operations ------------------------------------------------
def test_generate_plain_and_streaming_match_transformers(http, tok, hf):
    ids = tok.encode(PROMPT)
    gen = hf_greedy(hf["small"], ids, 8)
    body = {"prompt": PROMPT, "model": "small",
            "params": {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "logprobs": 1}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200 and r.headers["x-sizewise-tier"] == "small"
    out = r.json()
    assert out["token_ids"] == gen and out["prompt_token_ids"] == ids
    assert out["finish_reason"] == "length" and out["sizewise"]["model"] == "tiny-small"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}
    ref = hf_logprobs(hf["small"], ids + gen)[len(ids) - 1:]
    chosen = [entry[0] for entry in out["outputs"][0]["logprobs"]]  # sampled token first
    assert [c["token_id"] for c in chosen] == gen
    assert [c["logprob"] for c in chosen] == pytest.approx(ref, abs=2e-3)

    by_ids = http.post("/generate", json={**body, "prompt": None, "input_ids": ids,
                                          "sizewise": {"strategy": "plain", "max_latency_ms": 1000}}).json()
    assert by_ids["token_ids"] == gen and by_ids["text"] == out["text"]
    assert by_ids["sizewise"]["strategy"] == "plain"

    with http.stream("POST", "/generate", json={**body, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["x-sizewise-tier"] == "small"
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e for e in events[:-1] if "token_ids" in e]
    assert "".join(e["text"] for e in deltas) == out["text"]
    assert [t for e in deltas for t in e["token_ids"]] == gen
    assert events[-2]["usage"] == out["usage"]


def test_tokenize_and_detokenize(http, tok):
    r = http.post("/tokenize", json={"prompt": PROMPT, "model": "small"}).json()
    ids = tok.encode(PROMPT)
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == MAX_LEN
    messages = [{"role": "user", "content": "hi"}]
    r = http.post("/tokenize", json={"messages": messages}).json()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}
    r = http.post("/detokenize", json={"tokens": [0, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_tokenize_with_no_messages_says_what_is_wrong_with_them(http):
    r = http.post("/tokenize", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "at least 1 item" in r.json()["error"]["message"], r.text
    r = http.post("/tokenize", json={"model": "small"})  # neither: both named
    assert r.status_code == 400 and "exactly one of prompt and messages" in r.json()["error"]["message"], r.text


def test_tokenizer_info_and_version_like_vllm(http, tok, checkpoints):
    """GET /tokenizer_info as vLLM answers it (lm-evaluation-harness's tokenizer_backend=remote
    reads it), checked against the tokenizer transformers loads from the checkpoint itself."""
    r = http.get("/tokenizer_info")
    assert r.status_code == 200
    info = r.json()
    assert info["tokenizer_class"] == type(tok).__name__
    for name in ("bos_token", "eos_token", "pad_token"):
        assert info.get(name) == getattr(tok, name), name
    assert info["chat_template"] == tok.chat_template
    messages = [{"role": "user", "content": "hi"}]
    # A client renders chats with the template it was given, exactly as the server does.
    assert tok.apply_chat_template(messages, chat_template=info["chat_template"], tokenize=False,
                                   add_generation_prompt=True) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    added = {str(i): t.content for i, t in tok.added_tokens_decoder.items()}
    assert info["added_tokens_decoder"] == added
    assert str(checkpoints["llama"]) not in r.text and "name_or_path" not in info  # no paths of this machine
    assert http.get("/tokenizer_info", params={"model": "nope"}).status_code == 404
    from importlib.metadata import version

    assert http.get("/version").json() == {"version": version("sizewise")}


def test_health_ready_models_openapi(http):
    assert http.get("/health").status_code == 200
    r = http.get("/ready")
    assert r.status_code == 200 and set(r.json()["models"]) == {"tiny-small", "tiny-large"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"tiny-small", "tiny-large", "small", "large", "auto"}
    spec = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/generate", "/tokenize",
                 "/detokenize", "/tokenizer_info", "/version", "/health", "/ready", "/metrics"):
        assert path in spec["paths"], path
    assert "CompletionRequest" in json.dumps(spec["paths"]["/v1/completions"])


def test_ready_is_503_until_the_models_are_loaded(checkpoints, one_thread):
    gate = threading.Event()
    cfg = _config(checkpoints, tiers=("small",))

    def loader() -> Deployment:
        gate.wait(60)
        return _load(cfg)

    app = create_app(config=ServerSection(), loader=loader)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        assert h.get("/health").status_code == 200
        r = h.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 503 and r.json()["error"]["type"]
        gate.set()
        deadline = time.monotonic() + 60
        while h.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.05)
        r = h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "tiny-small"
        # The error metric counts the completion's 503, not /ready's: readiness polls are no model errors.
        errors = {dict(s.labels)["status"]: s.value for f in text_string_to_metric_families(h.get("/metrics").text)
                  if f.name == "sizewise_request_errors" for s in f.samples if s.name.endswith("_total")}
        assert {k: v for k, v in errors.items() if v} == {"503": 1.0}
    # the app loaded the deployment, so the app shut it down with the server
    assert not app.state.sizewise.serving.deployment.engine.alive


def _samples(text: str) -> dict:
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = s.value
    return out


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == v2 for k, v2 in labels.items()))


def test_metrics_count_what_the_responses_report(deployment):
    wait_idle(deployment)
    app = create_app(deployment)  # its own Metrics: counts only what this test sends
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        usages, choices = [], 0
        r = h.post("/v1/completions", json={"model": "small", "prompt": [PROMPT, "import os\n"], "n": 2,
                                            "max_tokens": 5, "temperature": 1.0, "seed": 5}).json()
        usages.append(r["usage"])
        choices += len(r["choices"])
        r = h.post("/v1/chat/completions", json={"model": "large", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 4}).json()
        usages.append(r["usage"])
        choices += len(r["choices"])
        body = {"model": "small", "prompt": PROMPT, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}
        with h.stream("POST", "/v1/completions", json=body) as s:
            events = sse_events(s.iter_lines())
        usages.append(events[-2]["usage"])
        choices += 1
        assert h.post("/v1/completions", json={"prompt": PROMPT, "temperature": -1}).status_code == 400
        assert h.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}).status_code == 404
        m = _samples(h.get("/metrics").text)
    assert _total(m, "sizewise_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert _total(m, "sizewise_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert _total(m, "sizewise_requests_total") == choices
    assert _total(m, "sizewise_route_decisions_total") == 4  # one per prompt routed (two prompts, chat, stream)
    assert _total(m, "sizewise_route_decisions_total", tier="small", reason="pinned") == 3
    assert _total(m, "sizewise_request_errors_total", status="400") == 1
    assert _total(m, "sizewise_request_errors_total", status="404") == 1
    assert _total(m, "sizewise_e2e_request_latency_seconds_count") == 4
    assert _total(m, "sizewise_time_to_first_token_seconds_count", tier="small") == 3
    assert _total(m, "sizewise_inter_token_latency_seconds_count") > 0
    assert _total(m, "sizewise_num_requests_running", model="tiny-small") == 0
    assert ("sizewise_kv_cache_usage_ratio", (("model", "tiny-large"), ("tier", "large"))) in m


def _generated(dep: Deployment, name: str) -> int:
    return dep.engine.stats()[name].generation_tokens_total


def test_disconnect_aborts_and_frees_kv(server, deployment):
    wait_idle(deployment)
    # 16 samples x LONG tokens: far more work than the moments between the first event and the
    # disconnect, so a request that was not aborted shows in the token count.
    body = {"model": "small", "prompt": PROMPT, "n": 16, "max_tokens": LONG, "ignore_eos": True,
            "temperature": 1.0}
    full = 16 * LONG
    before = _generated(deployment, "tiny-small")
    with httpx.Client(base_url=server, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break
        # leaving the block closed the connection mid-stream
    wait_idle(deployment)  # running 0, waiting 0, KV blocks 0
    assert _generated(deployment, "tiny-small") - before < full  # aborted, not run to the end

    # A non-streaming client that gives up: its request is aborted too.
    before = _generated(deployment, "tiny-small")
    with httpx.Client(base_url=server, timeout=httpx.Timeout(60, read=0.15)) as h:
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json=body)
    wait_idle(deployment)
    assert _generated(deployment, "tiny-small") - before < full


def test_request_timeout_aborts(deployment):
    wait_idle(deployment)
    app = create_app(deployment, ServerSection(request_timeout_s=0.05))
    body = {"model": "small", "prompt": PROMPT, "n": 4, "max_tokens": LONG, "ignore_eos": True}
    before = _generated(deployment, "tiny-small")
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        r = h.post("/v1/completions", json=body)
        assert r.status_code in (408, 504) and "timeout" in r.json()["error"]["message"]
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and "error" in events[-2]
        wait_idle(deployment)
        assert _generated(deployment, "tiny-small") - before < 2 * 4 * LONG
        assert h.post("/v1/completions", json={**body, "max_tokens": 1}).status_code == 200


def test_64_concurrent_streams_each_get_their_own_output(server, deployment):
    def request(i: int) -> dict:
        return dict(model=("small", "large")[i % 2], prompt=f"{i} {PROMPT}", max_tokens=16,
                    temperature=1.0, seed=i)

    async def stream_all() -> list[str]:
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as c:
            async def one(i: int) -> str:
                parts = []
                async for chunk in await c.completions.create(**request(i), stream=True):
                    assert chunk.choices[0].index == 0
                    parts.append(chunk.choices[0].text)
                return "".join(parts)

            async def bad(body: dict) -> int:
                try:
                    await c.completions.create(**body)
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            bad_bodies = [dict(model="small", prompt=PROMPT, temperature=-1),
                          dict(model="nope", prompt=PROMPT),
                          dict(model="small", prompt="x " * (2 * MAX_LEN)),
                          dict(model="small", prompt=PROMPT, max_tokens=10**6)]
            results = await asyncio.gather(*(one(i) for i in range(64)), *(bad(b) for b in bad_bodies))
            assert results[64:] == [400, 404, 400, 400]
            return list(results[:64])

    streamed = asyncio.run(stream_all())
    wait_idle(deployment)
    c = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60)
    alone = [c.completions.create(**request(i)).choices[0].text for i in range(64)]
    assert streamed == alone
    assert len(set(alone)) > 32  # distinct requests: a crossed stream could not go unnoticed


# ----- validation: every parameter out of range is a 400 naming it -------------------------------
_CASES = [
    ("/v1/completions", {"temperature": -0.5}, "temperature"),
    ("/v1/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 1000}, "n"),
    ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"top_k": -5}, "top_k"),
    ("/v1/completions", {"top_k": 2**70}, "top_k"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"seed": 2**64}, "seed"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("/v1/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"no_such_field": 1}, "no_such_field"),
    ("/v1/completions", {"sizewise": {"strategy": "fastest"}}, "sizewise.strategy"),
    ("/v1/completions", {"sizewise": {"bogus": 1}}, "sizewise.bogus"),
    ("/v1/completions", {"sizewise": {"max_latency_ms": -1}}, "sizewise.max_latency_ms"),
    ("/v1/chat/completions", {"temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("/generate", {"params": {"temperature": -1}}, "params.temperature"),
    ("/generate", {"params": {"max_tokens": 0}}, "params.max_tokens"),
    ("/generate", {"params": {"prompt_logprobs": 50}}, "params.prompt_logprobs"),
    ("/generate", {"params": {"bogus": 1}}, "params.bogus"),
    ("/generate", {"input_ids": [1, -4], "prompt": None}, "input_ids"),
]


@pytest.mark.parametrize("path,override,param", _CASES, ids=[f"{p}:{k}" for p, _, k in _CASES])
def test_out_of_range_is_400_naming_the_parameter(http, path, override, param):
    base = {"/v1/completions": {"model": "small", "prompt": PROMPT, "max_tokens": 2},
            "/v1/chat/completions": {"model": "small", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2},
            "/generate": {"model": "small", "prompt": PROMPT, "params": {"max_tokens": 2}}}[path]
    body = {k: v for k, v in {**base, **override}.items() if v is not None}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_is_400(http):
    r = http.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_internal_fault_is_500_without_a_trace_and_others_keep_working(checkpoints, one_thread, caplog):
    # A real misconfiguration: the router's default tier is not resident, so `auto` fails inside.
    dep = Deployment.load(_config(checkpoints, tiers=("small",)), router=StaticRouter("large"))
    try:
        with ServerThread(create_app(dep)) as url, httpx.Client(base_url=url, timeout=60) as h:
            with caplog.at_level("ERROR"):
                r = h.post("/v1/completions", json={"model": "auto", "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 500
            err = r.json()["error"]
            rid = r.headers["x-request-id"]
            assert rid in err["message"] and "Traceback" not in r.text and "KeyError" not in r.text
            logged = [rec for rec in caplog.records if rid in rec.getMessage()]
            assert logged and logged[0].exc_info is not None  # the trace is in the server log
            r = h.post("/v1/completions", json={"model": "small", "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 200
    finally:
        dep.shutdown()
