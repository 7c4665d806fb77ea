"""A stream's chunks, serialized from parts encoded once per stream, are exactly the JSON of the
whole chunk object (json.dumps of the dict is the reference) and parse as the OpenAI chunk."""

import json

import pytest

from sizewise.server.formatting import ChunkFormat, sse

BASE = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "demo-small"}
BRIEF = {"model": "demo-small", "tier": "small", "strategy": "plain", "reason": "pinned"}
WHOLE = {**BRIEF, "summary": "small: pinned", "explain": {"slo_ms": 1000.0, "tiers": {"small": {"latency_ms": 3.5}}}}


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("decision", [None, WHOLE])
@pytest.mark.parametrize("choice", [
    {"index": 0, "text": "plain", "logprobs": None, "finish_reason": None, "stop_reason": None},
    {"index": 3, "text": "quo\"te\\ new\nline é 漢 \u2028 \ud83d\ude00", "logprobs": None, "finish_reason": "stop",
     "stop_reason": "\n"},
    {"index": 1, "delta": {}, "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97]}]},
     "finish_reason": "length", "stop_reason": None},
])
def test_chunk_equals_whole_object(include_usage, decision, choice):
    fmt = ChunkFormat(BASE, BRIEF, include_usage)
    expected = {**BASE, "choices": [choice], "sizewise": decision or BRIEF}
    if include_usage:
        expected["usage"] = None
    got = fmt(choice, decision)
    assert got == sse(expected)
    assert got.startswith("data: ") and got.endswith("\n\n")
    assert json.loads(got[len("data: "):]) == expected
