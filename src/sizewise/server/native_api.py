"""Native routes: /generate (SamplingParams by name), /tokenize, /detokenize and /tokenizer_info (vLLM's shapes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import InvalidRequestError
from ..orchestrator.types import Prompt
from ..sampling_params import SamplingParams
from . import protocol as P
from .formatting import native_logprobs, sse
from .openai_api import _ERRORS, SSE_CONTENT, chat_messages
from .run import Run, collect_unless_disconnected, finished_outputs
from .serving import param_names, routing_hints, serving_of
from .streaming import EventStream, guarded


def _output_json(o, with_logprobs: bool) -> dict:
    d = {"index": o.index, "text": o.text, "token_ids": list(o.token_ids), "finish_reason": o.finish_reason,
         "stop_reason": o.stop_reason}
    if with_logprobs:
        d["cumulative_logprob"] = o.cumulative_logprob
        d["logprobs"] = native_logprobs(o.logprobs or [])
    return d


async def generate(body: P.GenerateRequest, request: Request):
    serving = serving_of(request)
    deadline = asyncio.get_running_loop().time() + serving.options.request_timeout_s
    if (body.prompt is None) == (body.input_ids is None):
        raise InvalidRequestError("give exactly one of prompt (text) and input_ids (token ids)", param="prompt")
    prompt_param = "prompt" if body.prompt is not None else "input_ids"

    def rename(p: str) -> str:
        if p.startswith("sizewise."):
            return p
        return prompt_param if p == "prompt" else f"params.{p}"

    with param_names(rename):
        params = SamplingParams(**body.params.model_dump())
    if body.prompt is not None:
        prompt = Prompt(await serving.encode_async(body.model, body.prompt), body.prompt)
    else:
        prompt = Prompt(list(body.input_ids))
    rid = serving.new_id("gen")
    with param_names(rename):
        run = await serving.submit([prompt], params, body.model, routing_hints(body.sizewise), rid, deadline)
    headers = {"x-sizewise-tier": run.tiers}
    with_lp = params.logprobs is not None
    if body.stream:
        return EventStream(guarded(_generate_stream(run, rid, with_lp), serving, run, rid), headers, run.close)
    await collect_unless_disconnected(run, request.receive)
    outs = [_output_json(o, with_lp) for _, o in finished_outputs(run)]
    job = run.jobs[0]
    first = outs[0]
    return JSONResponse({
        "id": rid, "model": run.decision.model, "text": first["text"], "token_ids": first["token_ids"],
        "finish_reason": first["finish_reason"], "stop_reason": first["stop_reason"],
        "prompt_token_ids": job.prompt.ids,
        "prompt_logprobs": native_logprobs(job.prompt_logprobs) if job.prompt_logprobs is not None else None,
        "outputs": outs, "usage": run.usage().to_json(), "sizewise": run.decision_json(),
    }, headers=headers)


async def _generate_stream(run: Run, rid: str, with_lp: bool) -> AsyncIterator[str]:
    # Each delta says where it was routed; the probe and the objective come once, in the last event.
    # Read at the first delta, not before: a capacity-plan move happens before the first token.
    brief = None
    async for job, delta in run.events():
        if brief is None:
            brief = run.decision.to_json(brief=True)
        for o in delta.outputs:
            event = {"id": rid, **_output_json(o, with_lp), "sizewise": brief}
            if delta.prompt_logprobs is not None:
                event["prompt_logprobs"] = native_logprobs(delta.prompt_logprobs)
            yield sse(event)
    yield sse({"id": rid, "usage": run.usage().to_json(), "sizewise": run.decision_json()})


async def tokenize(body: P.TokenizeRequest, request: Request):
    serving = serving_of(request)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
    tok = serving.tokenizer(body.model)
    if body.messages is not None:
        text = await serving.render_chat_async(body.model, chat_messages(body.messages), body.add_generation_prompt)
        ids = await serving.encode_async(body.model, text, add_special_tokens=bool(body.add_special_tokens),
                                         param="messages")
    else:
        ids = await serving.encode_async(body.model, body.prompt, add_special_tokens=body.add_special_tokens is not False)
    return {"count": len(ids), "max_model_len": serving.max_model_len(body.model), "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}


async def detokenize(body: P.DetokenizeRequest, request: Request):
    serving = serving_of(request)
    tok = serving.tokenizer(body.model)
    _, context, _ = serving.char_limit()
    if len(body.tokens) > context:  # no prompt or output of this server is longer: bounds the decode's work
        raise InvalidRequestError(f"tokens has {len(body.tokens)} ids, more than the longest context served here "
                                  f"({context} tokens)", param="tokens")
    vocab = serving.require().vocab_size(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}


# Loading details of this machine, not of the tokenizer: where its files were, how they were found.
_LOCAL_KEYS = {"name_or_path", "is_local", "local_files_only", "cache_dir", "tokenizer_object"}


def _jsonable(value):
    if hasattr(value, "content"):  # AddedToken: its text, as tokenizer_config.json writes it
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def tokenizer_config(tok) -> dict:
    """vLLM's /tokenizer_info body: the tokenizer's configuration as tokenizer_config.json holds
    it, its class and chat template (lm-evaluation-harness's remote tokenizer reads the special
    tokens and the template from it), less the paths and loading flags of this machine."""
    info = {k: _jsonable(v) for k, v in getattr(tok, "init_kwargs", {}).items()
            if k not in _LOCAL_KEYS and not k.endswith("_file")}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        if value is not None:
            info[name] = _jsonable(value)
    info["tokenizer_class"] = type(tok).__name__
    if getattr(tok, "chat_template", None):
        info["chat_template"] = tok.chat_template
    return info


async def tokenizer_info(request: Request, model: str | None = None):
    return tokenizer_config(serving_of(request).tokenizer(model))


def build_router(route_class, auth) -> APIRouter:
    r = APIRouter(route_class=route_class, dependencies=[auth], tags=["native"])
    r.add_api_route(
        "/generate", generate, methods=["POST"], summary="Generate (native API: SamplingParams by name)",
        responses={200: {"model": P.GenerateResponse, "content": SSE_CONTENT,
                         "description": "The outputs; with `stream: true`, Server-Sent Events of deltas"},
                   **_ERRORS})
    r.add_api_route("/tokenize", tokenize, methods=["POST"], summary="Text or chat messages -> token ids",
                    response_model=P.TokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
    r.add_api_route("/detokenize", detokenize, methods=["POST"], summary="Token ids -> text",
                    response_model=P.DetokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
    r.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"],
                    summary="The tokenizer's configuration, class and chat template (vLLM's shape)",
                    responses={404: _ERRORS[404]})
    return r

