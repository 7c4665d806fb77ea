"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import InvalidRequestError
from ..orchestrator.types import Prompt
from ..sampling_params import SamplingParams
from . import protocol as P
from .formatting import ChunkFormat, CompletionLogprobs, TokenText, chat_logprobs, sse
from .run import Run, collect_unless_disconnected, finished_outputs
from .serving import Serving, param_names, routing_hints, serving_of
from .streaming import EventStream, guarded

_ERRORS = {
    400: {"model": P.ErrorResponse, "description": "Invalid parameter (named in `error.param`)"},
    401: {"model": P.ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": P.ErrorResponse, "description": "Unknown model"},
    429: {"model": P.ErrorResponse, "description": "Waiting queue full (see Retry-After)"},
    503: {"model": P.ErrorResponse, "description": "Models not loaded yet"},
    504: {"model": P.ErrorResponse, "description": "Request timeout"},
}

# With `stream: true` the 200 is Server-Sent Events, documented beside the JSON body.
SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string", "description": "`data: {chunk}` events, then "
                                                                                  "`data: [DONE]`"}}}

_OPENAI_SAMPLING = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                    "include_stop_str_in_output")


def _deadline(serving: Serving) -> float:
    return asyncio.get_running_loop().time() + serving.options.request_timeout_s


def _common_kwargs(body: P._OpenAISampling) -> dict:
    if body.logit_bias:
        raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
    kw = {k: getattr(body, k) for k in _OPENAI_SAMPLING if getattr(body, k) is not None}
    if body.stop is not None:
        kw["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return kw


def _chunk_base(rid: str, obj: str, created: int, run: Run) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": run.decision.model}


# ----- completions -----------------------------------------------------------------------------
def _completion_params(body: P.CompletionRequest) -> tuple[SamplingParams, bool]:
    if body.suffix is not None:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n if body.n is not None else 1):
        raise InvalidRequestError("best_of is not supported (it may only equal n)", param="best_of")
    kw = _common_kwargs(body)
    drop = False
    if body.max_tokens == 0:
        if not body.echo:
            raise InvalidRequestError("max_tokens must be at least 1 (0 is only allowed with echo)", param="max_tokens")
        # Scoring a prompt: one token is generated (the engine needs a step) and dropped.
        kw["max_tokens"], kw["min_tokens"], drop = 1, 0, True
    else:
        kw["max_tokens"] = body.max_tokens
    if body.logprobs is not None:
        kw["logprobs"] = body.logprobs
        if body.echo:
            kw["prompt_logprobs"] = body.logprobs
    return SamplingParams(**kw), drop


async def _completion_prompts(serving: Serving, model: str, prompts: list[str | list[int]]) -> list[Prompt]:
    """The request's prompts (normalized by the protocol to a list of texts or token-id lists)."""
    return [Prompt(await serving.encode_async(model, p), p) if isinstance(p, str) else Prompt(list(p))
            for p in prompts]


def _echo_text(serving: Serving, run: Run, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else serving.tokenizer(run.decision.model).decode(prompt.ids)


async def create_completion(body: P.CompletionRequest, request: Request):
    serving = serving_of(request)
    deadline = _deadline(serving)
    model = body.model or "auto"
    params, drop = _completion_params(body)
    prompts = await _completion_prompts(serving, model, body.prompt)
    rid = serving.new_id("cmpl")
    run = await serving.submit(prompts, params, model, routing_hints(body.sizewise), rid, deadline, drop_output=drop)
    created = int(time.time())
    headers = {"x-sizewise-tier": run.tiers}
    text = TokenText(serving.tokenizer(run.decision.model))
    if body.stream:
        return EventStream(guarded(_completion_stream(serving, run, body, params, rid, created, text), serving, run, rid),
                           headers, run.close)
    await collect_unless_disconnected(run, request.receive)
    choices = []
    for job, o in finished_outputs(run):
        out_text, lp = o.text, None
        if body.logprobs is not None:
            clp = CompletionLogprobs(text)
            if body.echo:
                lp = clp.block(job.prompt.ids, job.prompt_logprobs or [None] * len(job.prompt.ids))
            lp = CompletionLogprobs.join(lp, clp.block(o.token_ids, o.logprobs or []))
        if body.echo:
            out_text = _echo_text(serving, run, job.prompt) + out_text
        choices.append({"index": job.index * params.n + o.index, "text": out_text, "logprobs": lp,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": run.decision.model,
        "choices": choices, "usage": run.usage().to_json(), "sizewise": run.decision_json(),
    }, headers=headers)


async def _completion_stream(serving: Serving, run: Run, body: P.CompletionRequest, params: SamplingParams,
                             rid: str, created: int, text: TokenText) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = _chunk_base(rid, "text_completion", created, run)
    lps: dict[int, CompletionLogprobs] = {}
    started: set[int] = set()
    # The routing decision goes out whole (probe, objective) in each prompt's first chunk and in
    # the usage chunk; the chunks between say where it went and why.
    sizewise = {job.index: job.decision.to_json() for job in run.jobs}
    # Each prompt's chunk format is made at its first delta, not before: a capacity-plan move happens
    # before the first token, so the brief decision cached per stream names the tier that answers.
    fmt: dict[int, ChunkFormat] = {}
    async for job, delta in run.events():
        if job.index not in fmt:
            fmt[job.index] = ChunkFormat(base, job.decision.to_json(brief=True), include_usage)
        for o in delta.outputs:
            idx = job.index * params.n + o.index
            first = idx not in started
            started.add(idx)
            out_text, lp = o.text, None
            if body.logprobs is not None:
                clp = lps.setdefault(idx, CompletionLogprobs(text))
                if first and body.echo:
                    ids = job.prompt.ids
                    lp = clp.block(ids, job.prompt_logprobs or [None] * len(ids))
                lp = CompletionLogprobs.join(lp, clp.block(o.token_ids, o.logprobs or []))
            if first and body.echo:
                out_text = _echo_text(serving, run, job.prompt) + out_text
            if not out_text and o.finish_reason is None and lp is None:
                continue  # text held back (stop-string window, incomplete UTF-8): nothing to say yet
            yield fmt[job.index]({"index": idx, "text": out_text, "logprobs": lp, "finish_reason": o.finish_reason,
                                  "stop_reason": o.stop_reason}, sizewise.pop(job.index, None))
    if include_usage:
        yield sse({**base, "choices": [], "usage": run.usage().to_json(), "sizewise": run.decision_json()})


# ----- chat ------------------------------------------------------------------------------------
def chat_messages(messages: list[P.ChatMessage]) -> list[dict]:
    """Pydantic messages (content already reduced to text by the protocol) -> template dicts."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        d["content"] = m.content if m.content is not None else ""
        out.append(d)
    return out


def _chat_params(body: P.ChatCompletionRequest) -> SamplingParams:
    if body.tools:
        raise InvalidRequestError("tools are not supported", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise InvalidRequestError("tool_choice is not supported", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError("only response_format {'type': 'text'} is supported", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    kw = _common_kwargs(body)
    kw["max_tokens"] = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.logprobs:
        kw["logprobs"] = body.top_logprobs or 0
    renames = {"logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        renames["max_tokens"] = "max_completion_tokens"
    with param_names(lambda p: renames.get(p, p)):
        return SamplingParams(**kw)


async def create_chat_completion(body: P.ChatCompletionRequest, request: Request):
    serving = serving_of(request)
    deadline = _deadline(serving)
    model = body.model or "auto"
    params = _chat_params(body)
    text = await serving.render_chat_async(model, chat_messages(body.messages), body.add_generation_prompt,
                                           body.chat_template_kwargs)
    prompt = Prompt(await serving.encode_async(model, text, add_special_tokens=False, param="messages"), text)
    rid = serving.new_id("chatcmpl")
    renames = {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {}
    with param_names(lambda p: renames.get(p, "messages" if p == "prompt" else p)):
        run = await serving.submit([prompt], params, model, routing_hints(body.sizewise), rid, deadline)
    created = int(time.time())
    headers = {"x-sizewise-tier": run.tiers}
    tt = TokenText(serving.tokenizer(run.decision.model))
    top_n = body.top_logprobs or 0
    if body.stream:
        return EventStream(guarded(_chat_stream(run, body, params, rid, created, tt, top_n), serving, run, rid),
                           headers, run.close)
    await collect_unless_disconnected(run, request.receive)
    choices = []
    for job, o in finished_outputs(run):
        lp = {"content": chat_logprobs(tt, o.token_ids, o.logprobs or [], top_n)} if body.logprobs else None
        choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text}, "logprobs": lp,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": run.decision.model,
        "choices": choices, "usage": run.usage().to_json(), "sizewise": run.decision_json(),
    }, headers=headers)


async def _chat_stream(run: Run, body: P.ChatCompletionRequest, params: SamplingParams, rid: str, created: int,
                       tt: TokenText, top_n: int) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = _chunk_base(rid, "chat.completion.chunk", created, run)
    # The routing decision goes out whole (probe, objective) in the first chunk and in the usage
    # chunk; the chunks between say where it went and why.
    decision = run.jobs[0].decision
    whole: list[dict] = [decision.to_json()]
    fmt = ChunkFormat(base, decision.to_json(brief=True), include_usage)

    def chunk(choice: dict) -> str:
        return fmt(choice, whole.pop() if whole else None)

    for i in range(params.n):  # the role first, as OpenAI streams it
        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
    async for job, delta in run.events():
        for o in delta.outputs:
            lp = {"content": chat_logprobs(tt, o.token_ids, o.logprobs or [], top_n)} if body.logprobs else None
            if not o.text and o.finish_reason is None and not (lp and lp["content"]):
                continue
            yield chunk({"index": o.index, "delta": {"content": o.text} if o.text else {}, "logprobs": lp,
                         "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    if include_usage:
        yield sse({**base, "choices": [], "usage": run.usage().to_json(), "sizewise": run.decision_json()})


# ----- models ----------------------------------------------------------------------------------
def model_cards(serving: Serving) -> list[dict]:
    dep = serving.require()
    created = int(time.time())
    infos = dep.describe()
    cards: dict[str, dict] = {}
    for m in infos:
        cards[m.name] = {"id": m.name, "object": "model", "created": created, "owned_by": "sizewise",
                         "root": m.name, "max_model_len": m.max_model_len,
                         "sizewise": {"kind": "model", "tier": m.tier}}
    for m in infos:
        cards.setdefault(m.tier, {"id": m.tier, "object": "model", "created": created, "owned_by": "sizewise",
                                  "root": m.name, "max_model_len": m.max_model_len,
                                  "sizewise": {"kind": "alias", "tier": m.tier, "model": m.name}})
    cards.setdefault("auto", {"id": "auto", "object": "model", "created": created, "owned_by": "sizewise",
                              "root": "auto", "max_model_len": dep.max_model_len("auto"),
                              "sizewise": {"kind": "router", "tiers": [m.tier for m in infos]}})
    return list(cards.values())


def build_router(route_class, auth) -> APIRouter:
    r = APIRouter(route_class=route_class, dependencies=[auth], tags=["OpenAI-compatible"])
    r.add_api_route(
        "/v1/completions", create_completion, methods=["POST"], summary="Create a completion",
        responses={200: {"model": P.CompletionResponse, "content": SSE_CONTENT,
                         "description": "The completion; with `stream: true`, Server-Sent Events of chunks"},
                   **_ERRORS})
    r.add_api_route(
        "/v1/chat/completions", create_chat_completion, methods=["POST"], summary="Create a chat completion",
        responses={200: {"model": P.ChatCompletionResponse, "content": SSE_CONTENT,
                         "description": "The completion; with `stream: true`, Server-Sent Events of chunks"},
                   **_ERRORS})

    async def list_models(request: Request):
        return {"object": "list", "data": model_cards(serving_of(request))}

    async def get_model(model_id: str, request: Request):
        serving = serving_of(request)
        cards = {c["id"]: c for c in model_cards(serving)}
        if model_id not in cards:
            serving.require().resolve(model_id)  # raises UnknownModelError (404)
        return cards[model_id]

    r.add_api_route("/v1/models", list_models, methods=["GET"], summary="Resident models, tier aliases and auto",
                    responses={200: {"model": P.ModelList}, 401: _ERRORS[401], 503: _ERRORS[503]})
    r.add_api_route("/v1/models/{model_id}", get_model, methods=["GET"], summary="One model, alias or auto",
                    responses={200: {"model": P.ModelCard}, 401: _ERRORS[401], 404: _ERRORS[404],
                               503: _ERRORS[503]})
    return r
