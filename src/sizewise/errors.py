"""The errors a request can meet on its way down, below every layer that raises or maps them:
the engine and the orchestrator raise them, the server maps each to one HTTP status
(server/errors.py) without importing either."""

from __future__ import annotations

from .text import clip


class InvalidRequestError(ValueError):
    """A request parameter is out of range. `param` names it (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine worker died or was shut down (HTTP 503)."""


class UnknownModelError(LookupError):
    """A request's `model` names no resident model, tier alias or `auto` (HTTP 404)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {clip(repr(name))} does not exist; available: {', '.join(known)}")
        self.name = name
