"""Incremental detokenization, token by token, against transformers' decode of the whole sequence:
characters split across tokens (UTF-8) are held back until complete, never streamed as U+FFFD, and
the streamed pieces concatenate to exactly `tokenizer.decode(all ids)`. The same for the Rust
backend's direct decode (fast tokenizers) and transformers' decode (any other tokenizer)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from sizewise.engine.core import load_tokenizer
from sizewise.engine.detokenizer import Detokenizer
from sizewise.engine.sequence import Sequence
from sizewise.sampling_params import SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "small"
TEXT = "héllo 漢字 😀 ok, ünïcödé\nnext line ½ ∑ 𝔘"


class _PlainDecode:
    """Only `decode`: what a tokenizer without a Rust backend offers (the fallback path)."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO)


@pytest.mark.parametrize("backend", [True, False])
@pytest.mark.parametrize("skip_special", [True, False])
def test_streamed_text_is_the_whole_decode(tok, backend, skip_special):
    special = tok.all_special_ids
    ids = tok.encode(TEXT, add_special_tokens=False)
    ids = ids[:5] + [special[1]] + ids[5:] + [special[2]]  # special tokens inside and at the end
    detok = Detokenizer(tok if backend else _PlainDecode(tok))
    assert (detok._backend_decode is not None) == backend
    params = SamplingParams(max_tokens=len(ids), skip_special_tokens=skip_special)
    seq = Sequence(0, SimpleNamespace(params=params), 0, [special[0]])
    pieces = []
    for i, t in enumerate(ids):
        seq.token_ids.append(t)
        assert detok.update(seq, 1) is None
        last = i == len(ids) - 1
        if last:
            detok.flush(seq)
        piece = Detokenizer.emittable(seq, finished=last)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special)
    assert sum(1 for p in pieces if p) < len(ids)  # some characters waited for their next byte
