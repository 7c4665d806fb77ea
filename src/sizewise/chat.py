"""A conversation rendered with a tokenizer's chat template: one routine for the HTTP server
(`/v1/chat/completions`, `/tokenize`) and the offline `LLM.chat`."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any

from .errors import InvalidRequestError

# Arguments of the template call that the caller sets itself, never the request's kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize"})
# Code a request would run on the server (as vLLM decided after CVE-2025-61620): its own template.
TEMPLATE_KWARG = "chat_template"
# jinja2 compiles a template from a string under this file name (transformers compiles them so).
_TEMPLATE_FILE = "<template>"


class _RenderTimeout(Exception):
    pass


@contextmanager
def _time_bound(seconds: float | None):
    """Abort the Jinja code this thread runs once `seconds` have passed: a trace function checks the
    clock at every call and, inside template code, at every line (a nested loop over a prebuilt
    list makes no call). Costs nothing outside templates; only this thread is traced."""
    if seconds is None:
        yield
        return
    end = time.monotonic() + seconds

    def line(frame, event, arg):
        if time.monotonic() > end:
            raise _RenderTimeout
        return line

    def call(frame, event, arg):
        if time.monotonic() > end:
            raise _RenderTimeout
        return line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_chat(
    tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None, where: str = "",
    *, trust_template_kwarg: bool = True, timeout_s: float | None = None,
) -> str:
    """The template's text for `messages`. As in vLLM, `template_kwargs` override
    `add_generation_prompt`; a template error is the caller's (InvalidRequestError on `messages`,
    its message prefixed with `where`). A server passes `trust_template_kwarg=False` (a template in
    the kwargs is refused) and `timeout_s` (rendering longer than that is a 400)."""
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {}))
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}",
                                  param="chat_template_kwargs")
    if not trust_template_kwarg and TEMPLATE_KWARG in (template_kwargs or {}):
        raise InvalidRequestError(
            f"chat_template_kwargs.{TEMPLATE_KWARG}: this server renders only its models' own chat templates "
            "(the operator can allow request templates with --trust-request-chat-template)",
            param=f"chat_template_kwargs.{TEMPLATE_KWARG}")
    kwargs = {"add_generation_prompt": add_generation_prompt, **(template_kwargs or {})}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        with _time_bound(timeout_s):
            return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except _RenderTimeout:
        raise InvalidRequestError(f"{where}the chat template did not render within the server's limit of "
                                  f"{timeout_s:g} s", param="messages") from None
    except Exception as e:  # noqa: BLE001 - template errors (role order, missing keys) are the caller's
        raise InvalidRequestError(f"{where}cannot render the chat template: {e}", param="messages") from None
