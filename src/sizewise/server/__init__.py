"""HTTP gateway: OpenAI-compatible /v1 API, native /generate, /tokenize, health, readiness, metrics."""

from .app import create_app, describe
from .runner import ServerThread

__all__ = ["create_app", "describe", "ServerThread"]
