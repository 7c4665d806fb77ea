"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a handler can meet is mapped here once, so a plain response, a stream's error
event and the metrics all agree on the status.
"""

from __future__ import annotations

import logging

from ..errors import EngineDeadError, InvalidRequestError, QueueFullError, UnknownModelError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait: about one batch of decode steps


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_ready(message: str = "models are still loading; retry when /ready returns 200") -> ApiError:
    return ApiError(503, message, type="service_unavailable_error", code="not_ready",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def request_timeout(seconds: float) -> ApiError:
    return ApiError(504, f"the request did not finish within the server's request timeout of {seconds:g} s "
                         "and was aborted", type="timeout_error", code="request_timeout")


def overloaded(waited_s: float, limit_s: float, limit: str) -> ApiError:
    """A request that cannot start within its limit: refused at admission, with the wait seen now."""
    retry = min(60, max(RETRY_AFTER_S, round(waited_s)))
    return ApiError(503, f"the server is overloaded: requests for this model have waited {waited_s:.1f} s to start, "
                         f"more than the limit of {limit_s:g} s ({limit}); retry after {retry} s",
                    type="service_unavailable_error", code="overloaded", headers={"Retry-After": str(retry)})


def queue_timeout(limit_s: float, limit: str) -> ApiError:
    """A queued request that did not start within its limit: aborted before it ran."""
    return ApiError(503, f"the request did not start within the limit of {limit_s:g} s ({limit}) and was "
                         f"dropped from the queue; retry after {RETRY_AFTER_S} s", type="service_unavailable_error",
                    code="queue_timeout", headers={"Retry-After": str(RETRY_AFTER_S)})


def read_timeout(seconds: float) -> ApiError:
    return ApiError(408, f"the request was not received within the server's read timeout of {seconds:g} s",
                    code="request_read_timeout")


def too_many_connections(limit: int) -> ApiError:
    return ApiError(503, f"the server holds its maximum of {limit} open connections; retry shortly",
                    type="service_unavailable_error", code="too_many_connections",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; the request was aborted", type="service_unavailable_error",
                    code="server_shutdown")


def to_api_error(exc: BaseException, request_id: str | None = None) -> ApiError:
    """Map any exception to the error the client sees; unknown ones are logged, never shown."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_parameter")
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"{exc}; retry after {RETRY_AFTER_S} s", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        log.error("request %s: %s", request_id, exc)
        return ApiError(503, "the inference engine is not running", type="service_unavailable_error",
                        code="engine_dead")
    # Internal fault: the stack trace goes to the server log under the request id, not to the client.
    log.error("request %s failed", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, f"internal server error (request id {request_id})", type="internal_error",
                    code="internal_error")
