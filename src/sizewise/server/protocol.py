"""Request and response bodies of the HTTP API (pydantic: this is the edge).

Requests reject unknown fields (OpenAI answers "Unrecognized request argument" too), so a typo
never silently changes behaviour. Ranges that `SamplingParams` already checks are left to it (one
source of truth); the models here check types, shapes and the bounds that guard the engine from
values it cannot represent (a seed or top_k beyond 64 bits would crash a batched step).
Response models document `/openapi.json`; handlers build plain dicts with the same shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ..sampling_params import SamplingParams

INT32_MAX = 2**31 - 1
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
# Every list a request sends is bounded (with an error naming the limit): the server and the
# engine walk them per request, some per step.
MAX_PROMPTS = 128  # prompts in one /v1/completions request (each is an engine request)
MAX_MESSAGES = 1024
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
StopList = Annotated[list[str], Field(max_length=SamplingParams.MAX_STOP)]
StopIds = Annotated[list[int], Field(max_length=SamplingParams.MAX_STOP_TOKEN_IDS)]


class _Request(BaseModel):
    # Strict: `"max_tokens": true` is not 1 token, `"n": "2"` not two choices, `"stream": "yes"` not
    # a stream (an int still passes for a float, as JSON has one number type).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# ----- shared pieces ------------------------------------------------------------------------
class SizewiseOptions(_Request):
    """Routing hints for the orchestrator."""

    strategy: Literal["auto", "plain", "pld", "draft"] = "auto"
    max_latency_ms: float | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    # Lenient: newer SDKs add keys (e.g. include_obfuscation) that change nothing here.
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


def _normalize_prompt(v: Any) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a non-empty list of str or token-id lists."""

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and not is_ids(v) and len(v) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
    if isinstance(v, list) and v:
        if is_ids(v):
            return [v]
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(isinstance(x, list) and x and is_ids(x) for x in v):
            return [list(x) for x in v]
    if isinstance(v, list) and not v:
        raise ValueError("must not be empty")
    raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extensions)."""

    model: str = "auto"
    # OpenAI allows null for most fields (n, stream, echo, logprobs included): null is the default.
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | StopList | None = None
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)  # accepted only when empty
    # vLLM extensions
    top_k: int | None = Field(default=None, le=INT32_MAX)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(default=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: StopIds | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # sizewise routing hints
    sizewise: SizewiseOptions | None = None

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_fit(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not -INT32_MAX <= t <= INT32_MAX for t in v):
            raise ValueError("token ids must be 32-bit integers")
        return v


_OpenAISampling = _SamplingFields  # the name the route modules use


# ----- /v1/completions ------------------------------------------------------------------------
_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
# What `_normalize_prompt` accepts, for /openapi.json (the field is `Any` so that the validator sees it raw).
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS}, _IDS,
    {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_PROMPTS}]}


class CompletionRequest(_SamplingFields):
    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)] = Field(
        description="a string, a list of strings, a list of token ids or a list of token-id lists")
    max_tokens: int | None = Field(default=16, le=INT32_MAX)
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None  # accepted only when absent
    best_of: int | None = None  # accepted only when absent or equal to n

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        return _normalize_prompt(v)


# ----- /v1/chat/completions -------------------------------------------------------------------
class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # What `_content` accepts, for /openapi.json.
    content: Annotated[Any, WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "null"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
            "type": {"const": "text"}, "text": {"type": "string"}}}}]})] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        """Plain text, or a list of text parts (joined); other part types are refused."""
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # Accepted for client compatibility when they ask for nothing we lack.
    response_format: dict | None = None
    tools: list | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None
    chat_template_kwargs: dict | None = None


# ----- /generate (native) ---------------------------------------------------------------------
class GenerateParams(_Request):
    """The fields of `sizewise.SamplingParams` (same names, same defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(default=0, le=INT32_MAX)
    min_p: float = 0.0
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | StopList = Field(default_factory=list)
    stop_token_ids: StopIds = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = Field(default=16, le=INT32_MAX)
    min_tokens: int = Field(default=0, le=INT32_MAX)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_fit(cls, v: list[int]) -> list[int]:
        if any(not -INT32_MAX <= t <= INT32_MAX for t in v):
            raise ValueError("token ids must be 32-bit integers")
        return v


class GenerateRequest(_Request):
    prompt: str | None = None
    input_ids: list[int] | None = None
    params: GenerateParams = Field(default_factory=GenerateParams)
    model: str = "auto"
    stream: bool = False
    sizewise: SizewiseOptions | None = None  # exactly one of prompt / input_ids: checked by the route (400 naming it)


# ----- /tokenize, /detokenize (vLLM shapes) ---------------------------------------------------
class TokenizeRequest(_Request):
    model: str = "auto"
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False  # exactly one of prompt / messages: checked by the route


class DetokenizeRequest(_Request):
    model: str = "auto"
    tokens: list[int]


# ----- responses (documentation; handlers return dicts of these shapes) -----------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RouteInfo(BaseModel):
    """Which resident model answered and why (`Decision.to_json()`)."""

    model: str
    tier: str
    strategy: str
    reason: str
    probe: dict | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sizewise: RouteInfo


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sizewise: RouteInfo


class GenerateOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[list[dict]] | None = None


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    outputs: list[GenerateOutput]
    prompt_token_ids: list[int]
    prompt_logprobs: list[list[dict] | None] | None = None
    usage: Usage
    sizewise: RouteInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sizewise"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    sizewise: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def all_field_names() -> frozenset[str]:
    """Every field name of the request models: tells a field from a pydantic type tag in an error loc."""
    names: set[str] = set()
    for m in (SizewiseOptions, StreamOptions, CompletionRequest, ChatMessage, ChatCompletionRequest,
              GenerateParams, GenerateRequest, TokenizeRequest, DetokenizeRequest):
        names.update(m.model_fields)
    return frozenset(names)
