"""Engine outputs -> OpenAI / native JSON (plain dicts) and Server-Sent Events."""

from __future__ import annotations

import json

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token the model rules out gets this (as vLLM does)


# One encoder for every chunk: json.dumps with non-default arguments builds a JSONEncoder per call
# (1.5 of its 3.2 us for a streamed chunk's choice). Stateless, so shared safely.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else _dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


class ChunkFormat:
    """The SSE chunks of one OpenAI stream, `{**base, "choices": [choice], "sizewise": ...[, "usage":
    null]}`: what every chunk repeats (id, object, created, model, the brief routing decision) is
    serialized once per stream, so a chunk costs the encoding of its one choice."""

    def __init__(self, base: dict, brief: dict, include_usage: bool) -> None:
        self._head = "data: " + _dumps(base)[:-1] + ',"choices":['
        self._usage = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self._brief = '],"sizewise":' + _dumps(brief) + self._usage

    def __call__(self, choice: dict, sizewise: dict | None = None) -> str:
        """`sizewise`: the decision to send instead of the brief one (the whole one, once)."""
        tail = self._brief if sizewise is None else '],"sizewise":' + _dumps(sizewise) + self._usage
        return self._head + _dumps(choice) + tail


def _lp(v: float) -> float:
    return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR


class TokenText:
    """Token id -> its text, for logprobs (special tokens shown, cached per request)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = s
        return s


class CompletionLogprobs:
    """OpenAI's legacy completion logprobs, built incrementally (a stream sends slices)."""

    def __init__(self, text: TokenText) -> None:
        self.text = text
        self.offset = 0  # text_offset of the next token, in characters of the choice's text

    def block(self, token_ids: list[int], entries: list[dict[int, float] | None]) -> dict:
        """`entries[i]`: {token: logprob, then top-N} for token_ids[i], or None (first prompt token)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            s = self.text(tid)
            tokens.append(s)
            offsets.append(self.offset)
            self.offset += len(s)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_lp(entry[tid]) if tid in entry else None)
            top: dict[str, float] = {}
            for t, v in entry.items():
                top.setdefault(self.text(t), _lp(v))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    @staticmethod
    def join(a: dict | None, b: dict) -> dict:
        if a is None:
            return b
        return {k: a[k] + b[k] for k in b}


def chat_logprobs(text: TokenText, token_ids: list[int], entries: list[dict[int, float]], top_n: int) -> list[dict]:
    out = []
    for tid, entry in zip(token_ids, entries):
        s = text(tid)
        ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        out.append({
            "token": s, "logprob": _lp(entry[tid]), "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": text(t), "logprob": _lp(v), "bytes": list(text(t).encode("utf-8"))} for t, v in ranked
            ],
        })
    return out


def native_logprobs(entries: list[dict[int, float] | None]) -> list[list[dict] | None]:
    return [None if e is None else [{"token_id": t, "logprob": _lp(v)} for t, v in e.items()] for e in entries]

