"""Incremental detokenization and stop-string handling.

Text is decoded over a short window of recent tokens (prefix_offset .. end) so a step costs
O(window), and a trailing U+FFFD (an incomplete UTF-8 sequence split across tokens) is held
back until the next token completes it. While a stop string could still be forming, the last
len(longest stop) - 1 characters are held back too, so streamed text always concatenates to
exactly the final text.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from .sequence import Sequence


class TextState:
    """The detokenizer's state of one sample outside a `Sequence` (the same fields): where the
    deltas are read, not where they are made (the API process of `serve --engine-process`)."""

    __slots__ = ("params", "output_token_ids", "output_text", "emitted_text_len", "prefix_offset", "read_offset",
                 "stop_search_from", "done")

    def __init__(self, params) -> None:
        self.params = params
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.emitted_text_len = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_search_from = 0
        self.done = False  # finished (by the engine, or by a stop string found here)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust `tokenizers.Tokenizer`: decoding through it directly is what
        # transformers' decode does without clean-up, minus ~2 us of Python wrapping per call
        # (two calls per token, on the engine's thread).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if isinstance(backend, Tokenizer) else None

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=skip_special)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def update(self, seq: Sequence | TextState, num_new: int) -> str | None:
        """Advance `seq.output_text` by the last `num_new` output tokens; return a matched stop string."""
        skip = seq.params.skip_special_tokens
        out = seq.output_token_ids
        prefix = self._decode(out[seq.prefix_offset:seq.read_offset], skip)
        full = self._decode(out[seq.prefix_offset:], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.output_text += full[len(prefix):]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(out)
        stops = seq.params.stop
        if not stops:
            return None
        if seq.num_output_tokens <= seq.params.min_tokens:
            # As in vLLM: a stop string may not end the sequence, nor start, within min_tokens.
            seq.stop_search_from = len(seq.output_text)
            return None
        # Only the region the new text could have completed needs searching.
        longest = max(len(s) for s in stops)
        search_from = max(seq.stop_search_from, seq.emitted_text_len - longest)
        text = seq.output_text
        best: tuple[int, str] | None = None
        for s in stops:
            i = text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        seq.output_text = text[: i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
        return s

    def flush(self, seq: Sequence | TextState) -> None:
        """At finish: include text still held back for an incomplete UTF-8 tail."""
        out = seq.output_token_ids
        if seq.read_offset < len(out):
            skip = seq.params.skip_special_tokens
            prefix = self._decode(out[seq.prefix_offset:seq.read_offset], skip)
            full = self._decode(out[seq.prefix_offset:], skip)
            if len(full) > len(prefix):
                seq.output_text += full[len(prefix):]
            seq.read_offset = len(out)

    @staticmethod
    def emittable(seq: Sequence | TextState, finished: bool) -> str:
        """Text that may be streamed now; advances `emitted_text_len`."""
        end = len(seq.output_text)
        if not finished and seq.params.stop:
            end = max(seq.emitted_text_len, end - (max(len(s) for s in seq.params.stop) - 1))
        delta = seq.output_text[seq.emitted_text_len:end]
        seq.emitted_text_len = end
        return delta
