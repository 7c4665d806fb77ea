"""Client text quoted back in messages: bounded, so an error never echoes a megabyte."""

from __future__ import annotations

ECHO_CHARS = 80


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` itself, or its first `limit` - 3 characters and '...'."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
