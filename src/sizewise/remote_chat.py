"""`sizewise chat --url`: a conversation with a running server through its OpenAI API, routed by it
(`auto` unless a model is named). After each answer one line says which tier answered and why.

Only the standard library: the client side imports neither torch nor an HTTP package, so it starts
at once and runs from the runtime install."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Callable


class RemoteError(Exception):
    """The server refused a request or could not be reached: one line for the user."""


class Client:
    """The two endpoints the chat uses: GET /v1/models and a streamed POST /v1/chat/completions."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310 - the user's own URL
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise RemoteError(f"{e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RemoteError(f"cannot reach {self.url} ({reason}); is `sizewise serve` running there?") from None

    def models(self) -> list[str]:
        with self._open("/v1/models") as resp:
            return [m["id"] for m in json.load(resp)["data"]]

    def chat(self, body: dict, on_text: Callable[[str], None]) -> dict:
        """Streams one answer to `on_text`; returns the response's `sizewise` object (the whole
        one, which the stream carries in its first chunk; later chunks repeat a short form)."""
        routed: dict = {}
        with self._open("/v1/chat/completions", {**body, "stream": True}) as resp:
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RemoteError(chunk["error"].get("message", str(chunk["error"])))
                sw = chunk.get("sizewise")
                if isinstance(sw, dict) and len(sw) > len(routed):
                    routed = sw
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        on_text(text)
        return routed


def route_line(routed: dict) -> str:
    """One short line: which tier answered and why (the server's `summary` where it gives one)."""
    if not routed:
        return "[no routing information in the response]"
    who = f"{routed.get('model', '?')} ({routed.get('tier', '?')}, {routed.get('strategy', '?')})"
    why = routed.get("summary") or f"reason: {routed.get('reason', '?')}"
    return f"[{who}: {why}]"


def run(url: str, model: str, api_key: str | None, sampling: dict, system: str | None, help_text: str) -> int:
    client = Client(url, api_key)
    names = client.models()  # fails here, before the prompt, when the server is not there
    if model not in names:
        raise RemoteError(f"model {model!r} is not served at {client.url}; it serves {', '.join(names)}")
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(f"sizewise chat: {client.url}, model {model} (serving {', '.join(n for n in names if n != model)}). "
          f"{help_text}.", file=sys.stderr, flush=True)
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print(f"\n({help_text})")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/bye", "/quit"):
            return 0
        if command in ("/clear", "/help"):
            if command == "/clear":
                messages = list(opening)
            print("(conversation cleared)" if command == "/clear" else f"({help_text})")
            continue
        messages.append({"role": "user", "content": line})
        parts: list[str] = []
        try:
            routed = client.chat({"model": model, "messages": messages, **sampling},
                                 lambda t: (parts.append(t), write(t)))
        except KeyboardInterrupt:
            print("\n(stopped; that turn is forgotten)")
            messages.pop()
            continue
        except RemoteError as e:
            print(f"error: {e} (that turn is forgotten; /clear starts a new conversation)", file=sys.stderr)
            messages.pop()
            continue
        print()
        print(route_line(routed), flush=True)
        messages.append({"role": "assistant", "content": "".join(parts)})
