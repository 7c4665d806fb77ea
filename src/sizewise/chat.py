"""A conversation rendered with a tokenizer's chat template: one routine for the HTTP server
(`/v1/chat/completions`, `/tokenize`) and the offline `LLM.chat`."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError

# Arguments of the template call that the caller sets itself, never the request's kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize"})


def render_chat(
    tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None, where: str = "",
) -> str:
    """The template's text for `messages`. As in vLLM, `template_kwargs` override
    `add_generation_prompt`; a template error is the caller's (InvalidRequestError on `messages`,
    its message prefixed with `where`)."""
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {}))
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}",
                                  param="chat_template_kwargs")
    kwargs = {"add_generation_prompt": add_generation_prompt, **(template_kwargs or {})}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - template errors (role order, missing keys) are the caller's
        raise InvalidRequestError(f"{where}cannot render the chat template: {e}", param="messages") from None
