"""The FastAPI application: routes, auth, errors, health, readiness and metrics.

`create_app(deployment)` serves a loaded Deployment (the caller owns it). `create_app(config=...,
loader=fn)` starts serving /health at once and runs `fn()` (e.g. `Deployment.load(cfg)`) in a
background thread; /ready and every model route answer 503 until it returns, and the app owns
(and shuts down) what it loaded. Everything lives on the app instance: two apps in one process
share nothing but what they are given.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import threading
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..metrics import Metrics
from ..orchestrator.deployment import Deployment, ServerSection
from ..text import clip
from . import native_api, openai_api
from . import protocol as P
from .errors import ApiError, to_api_error
from .memory import TRIM_AFTER_BYTES, release_free_memory
from .run import ClientGone
from .serving import Serving, ServingOptions

log = logging.getLogger(__name__)

API_KEYS_ENV = "SIZEWISE_API_KEYS"
MAX_BODY_BYTES = 64 << 20  # far above any prompt a context window holds; stops runaway uploads


@dataclass(slots=True)
class AppState:
    serving: Serving
    api_keys: tuple[str, ...]
    metrics_require_auth: bool
    loader: Callable[[], Deployment] | None = None
    on_load_error: Callable[[BaseException], None] | None = None
    owns_deployment: bool = False
    closed: bool = False
    loader_thread: threading.Thread | None = None
    config: ServerSection | None = None
    loop: asyncio.AbstractEventLoop | None = None  # the app's event loop (a loaded deployment attaches to it)


def describe(deployment: Deployment) -> list[str]:
    """One line per resident model: what an operator wants to see at startup."""
    return [
        f"{m.name} ({m.tier}): {m.family} {m.num_params / 1e6:.1f}M params on {m.device} ({m.dtype}), KV cache "
        f"{m.kv_cache_bytes / 2**20:.1f} MiB = {m.num_blocks} blocks x {m.block_size} tokens, "
        f"max_model_len {m.max_model_len}"
        for m in deployment.describe()
    ]


# ----- errors ------------------------------------------------------------------------------------
_FIELDS = P.all_field_names()
_GENERATE_PARAMS = frozenset(P.GenerateParams.model_fields)  # /generate: these go in "params"


def _validation_error(exc: RequestValidationError, path: str = "") -> ApiError:
    """FastAPI's 422 -> OpenAI's 400 naming the parameter."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    # A union (`str | list[str]`) reports one error per member: of the first field's errors, the
    # one that is not "wrong type" says what is wrong with the value (a list over its length).
    first = [x for x in errors if x.get("loc", ())[:2] == errors[0].get("loc", ())[:2]]
    e = next((x for x in first if not str(x.get("type", "")).endswith("_type")), errors[0])
    # Keep field names and list indices; drop the location kind and pydantic's union-member tags.
    loc = [str(x) for x in e.get("loc", ())[1:] if isinstance(x, int) or x in _FIELDS]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "extra_forbidden":  # the unknown name is no field: keep the whole path
        name = clip(".".join(str(x) for x in e.get("loc", ())[1:]))
        hint = ""
        if path == "/generate" and name in _GENERATE_PARAMS:  # OpenAI habit: sampling fields at the top
            hint = f' (/generate takes sampling parameters inside "params": {{"params": {{"{name}": ...}}}})'
        return ApiError(400, f"unrecognized request argument supplied: {name}{hint}", param=name)
    if param is None and isinstance(e.get("input"), bytes):  # a body sent with another Content-Type
        return ApiError(400, "the request body was not read as JSON: send it with the header "
                             "'Content-Type: application/json'")
    if param is None and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object")
    if e.get("type") == "missing":
        return ApiError(400, f"{param} is required", param=param)
    got = clip(repr(e.get("input")))
    return ApiError(400, f"{param}: {e.get('msg')} (got {got})" if param else str(e.get("msg")), param=param)


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    if isinstance(exc, StarletteHTTPException) and isinstance(exc.__cause__, ApiError):
        exc = exc.__cause__  # FastAPI wraps errors raised while reading the body (e.g. 413)
    if isinstance(exc, RequestValidationError):
        err = _validation_error(exc, request.url.path)
    elif isinstance(exc, StarletteHTTPException):
        err = ApiError(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                       else "internal_error", headers=dict(exc.headers or {}))
    else:
        err = to_api_error(exc, getattr(request.state, "request_id", None))
    if _is_model_request(request.scope):
        request.app.state.sizewise.serving.record_error(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _is_model_request(scope: Scope) -> bool:
    """A request for a model route (not /health, /ready, /metrics, nor a path that is no route):
    only these count in the error metric, which is about the models' answers."""
    route = scope.get("route")
    if route is None:  # not routed yet (the body limit) or no such path: find the route it is for
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] == Match.FULL), None)
    return isinstance(route, _Route) and route.model_route


class _Route(APIRoute):
    """Every failure inside a route (dependencies and validation included) -> OpenAI's format."""

    model_route = True

    def get_route_handler(self) -> Callable:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except ClientGone:
                return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
            except Exception as e:  # noqa: BLE001 - mapped (and logged when internal) by error_response
                return error_response(request, e)

        return handler


class _OpsRoute(_Route):
    model_route = False


class _Edge:
    """Pure ASGI middleware (keeps streaming and disconnects untouched): an id per request, in
    `request.state.request_id`, the `x-request-id` header and server-side error logs; and an
    oversized body refused from its Content-Length before anything reads it (413, OpenAI format)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_error: Callable[[int, Scope], None],
                 stopping: Callable[[], bool] = lambda: False, loopback_only: bool = False,
                 health: Callable[[], tuple[int, dict]] | None = None) -> None:
        self.app = app
        self.health = health
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self.stopping = stopping
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        headers = dict(scope.get("headers", []))
        if self.loopback_only and not _is_loopback_host(headers.get(b"host", b"").decode("latin-1")):
            # DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches a local server
            # with its own name as Host. A loopback server answers only to loopback names.
            self.on_error(400, scope)
            err = ApiError(400, "the Host header must name this machine (localhost, 127.0.0.1 or [::1]) on a "
                                "server bound to a loopback address", code="invalid_host")
            await JSONResponse(err.body(), status_code=400)(scope, receive, send_with_id)
            return
        if self.health is not None and scope["path"] == "/health" and scope["method"] == "GET":
            # Liveness answered here, before routing: under a burst it waits for the event loop
            # only, not behind the framework's per-request work (the route stays for the schema).
            status, body = self.health()
            await JSONResponse(body, status_code=status)(scope, receive, send_with_id)
            return
        limit = self.max_body_bytes
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > limit:
            self.on_error(413, scope)
            await JSONResponse(_too_large(limit).body(), status_code=413)(scope, receive, send_with_id)
            return
        seen = 0

        async def receive_bounded() -> Message:
            # A chunked upload has no Content-Length: count; the route's error handler answers.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        try:
            await self.app(scope, receive_bounded, send_with_id)
            if seen >= TRIM_AFTER_BYTES:  # the body, its JSON and its text are garbage now: give them back
                await asyncio.to_thread(release_free_memory)
        except asyncio.CancelledError:
            if not self.stopping():
                raise
            # uvicorn cancels what still runs when its graceful-shutdown window ends (a response
            # whose client stopped reading: everything else was ended by Serving.begin_shutdown)
            # or at a second Ctrl-C. One line for it, not a traceback per request.
            log.warning("request %s: response cut short by the server's shutdown", rid)


def health_state(serving: Serving) -> tuple[int, dict]:
    """/health's status and body: reads flags only, never waits on the engine or the models."""
    if serving.load_error is not None:
        return 503, {"status": "failed", "error": str(serving.load_error)}
    if serving.deployment is not None and not serving.deployment.alive:
        return 503, {"status": "engine_dead"}
    return 200, {"status": "ok" if serving.deployment is not None else "loading"}


def liveness(app) -> Callable[[str], tuple[int, dict] | None] | None:
    """/health for the connection layer to answer before the app (server/connections.py): given the
    request's Host header, its status and body, or None where the app must answer (a Host that a
    loopback-bound server refuses). None for an app that is not sizewise's."""
    state = getattr(getattr(app, "state", None), "sizewise", None)
    if state is None:
        return None
    loopback_only = state.config is not None and _is_loopback_host(state.config.host)

    def answer(host: str) -> tuple[int, dict] | None:
        if loopback_only and not _is_loopback_host(host):
            return None
        return health_state(state.serving)
    return answer


def _is_loopback_host(host: str) -> bool:
    """A Host header value ("localhost:8000", "[::1]:8000", "127.0.0.1") names a loopback address."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the limit of {limit} bytes", code="body_too_large")


# ----- the app -----------------------------------------------------------------------------------
def create_app(
    deployment: Deployment | None = None,
    config: ServerSection | None = None,
    *,
    loader: Callable[[], Deployment] | None = None,
    metrics: Metrics | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    if (deployment is None) == (loader is None):
        raise ValueError("give exactly one of a loaded deployment or a loader")
    if config is None:
        config = deployment.config.server if deployment is not None else ServerSection()
    keys = [k for k in config.api_keys if k]
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    serving = Serving(metrics or Metrics(), ServingOptions(
        request_timeout_s=config.request_timeout_s, trust_request_chat_template=config.trust_request_chat_template,
        chat_template_timeout_s=config.chat_template_timeout_s, max_queued_deltas=config.max_queued_deltas,
        max_queue_delay_s=config.max_queue_delay_s))
    state = AppState(serving, tuple(keys), config.metrics_require_auth, loader, on_load_error,
                     owns_deployment=loader is not None, config=config)
    if deployment is not None:
        serving.set_deployment(deployment)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        if state.loader is not None:
            state.loader_thread = threading.Thread(target=_load, args=(state,), name="sizewise-loader", daemon=True)
            state.loader_thread.start()
        try:
            yield
        finally:
            state.closed = True
            if state.owns_deployment and serving.deployment is not None:
                serving.deployment.shutdown()

    app = FastAPI(
        title="sizewise", version=__version__, lifespan=lifespan,
        description="Adaptive multi-size LLM serving: OpenAI-compatible API, native /generate, metrics.",
        # A body must say it is JSON: a web page can POST text/plain (or no type) cross-origin
        # without a preflight, but not application/json.
        strict_content_type=True,
    )
    app.state.sizewise = state
    def on_edge_error(status: int, scope: Scope) -> None:
        if _is_model_request({**scope, "app": app}):
            serving.record_error(status)

    app.add_middleware(_Edge, max_body_bytes=MAX_BODY_BYTES, on_error=on_edge_error,
                       stopping=lambda: serving.stopping, loopback_only=_is_loopback_host(config.host),
                       health=lambda: health_state(serving))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc)

    bearer = HTTPBearer(auto_error=False, description="API key (when the server is configured with keys)")

    def check_key(creds: HTTPAuthorizationCredentials | None) -> None:
        if not state.api_keys:
            return
        given = creds.credentials if creds is not None else None
        # compare_digest against every key: the time taken does not say which prefix matched.
        if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in state.api_keys):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if given is None
                           else "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def require_key(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        check_key(creds)

    async def metrics_key(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if state.metrics_require_auth:
            check_key(creds)

    auth = Depends(require_key)
    app.include_router(openai_api.build_router(_Route, auth))
    app.include_router(native_api.build_router(_Route, auth))

    async def health() -> JSONResponse:
        """Liveness: the process answers; 503 once the engine worker died or loading failed."""
        status, body = health_state(serving)
        return JSONResponse(body, status_code=status)

    async def ready() -> JSONResponse:
        """Readiness: every model loaded and the engine running."""
        if not serving.ready:
            serving.require()  # raises the 503 that says why (loading, failed)
            raise ApiError(503, "the inference engine is not running", type="service_unavailable_error",
                           code="engine_dead")
        return JSONResponse({"status": "ready", "models": [m.name for m in serving.deployment.describe()]})

    async def metrics_endpoint() -> Response:
        await serving.refresh_stats()
        return Response(serving.scrape(), media_type=CONTENT_TYPE_LATEST)

    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    if not state.api_keys:
        # No key is checked: the schema must not say a bearer token is required.
        _document_no_auth(app)

    ops = dict(route_class_override=_OpsRoute, tags=["operations"])
    app.router.add_api_route("/health", health, methods=["GET"], summary="Liveness", **ops)
    app.router.add_api_route("/ready", ready, methods=["GET"], summary="Readiness (503 until models are loaded)",
                             responses={503: {"model": P.ErrorResponse}}, **ops)
    app.router.add_api_route("/metrics", metrics_endpoint, methods=["GET"], summary="Prometheus metrics",
                             dependencies=[Depends(metrics_key)], response_class=Response,
                             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}, **ops)
    app.router.add_api_route("/version", version, methods=["GET"], summary="The server's version (vLLM's shape)",
                             **ops)
    return app


def _document_no_auth(app: FastAPI) -> None:
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
            schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _load(state: AppState) -> None:
    deployment = None
    try:
        deployment = state.loader()
        attach = getattr(deployment, "attach", None)
        if attach is not None and not state.closed:  # an engine-process deployment serves on the app's loop
            asyncio.run_coroutine_threadsafe(attach(), state.loop).result()  # (orchestrator/remote.py)
    except BaseException as e:  # noqa: BLE001 - reported by /health, /ready and the callback
        if deployment is not None:
            deployment.shutdown()
        if state.closed:  # stopped (Ctrl-C, SIGTERM) while loading: not a failure to load
            log.info("stopped while loading the models (%s)", e)
            return
        if isinstance(e, (ValueError, OSError)):  # bad config, memory plan, checkpoint: the message says it all
            log.error("loading the deployment failed: %s", e)
        else:
            log.exception("loading the deployment failed")
        state.serving.load_error = e
        if state.on_load_error is not None:
            state.on_load_error(e)
        return
    if state.closed:  # the server stopped while we were loading
        deployment.shutdown()
        return
    state.serving.set_deployment(deployment)
    lines = describe(deployment)
    for line in lines:
        log.info("loaded %s", line)
    log.info("ready: %d model(s) resident", len(lines))
