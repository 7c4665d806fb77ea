"""The one n-gram matcher: prompt lookup's proposer and the probe's copyability replay both run it.

`NgramIndex` keeps, for every n in [min_n, max_n], the latest position that followed each n-gram
of a token stream; appending a token registers the n-grams that end just before it. A proposal is
the continuation after the latest earlier occurrence of the stream's longest suffix n-gram (max_n
down to min_n). Per appended token O(max_n) dict updates, per proposal O(max_n + k) lookups, so a
sequence pays for its new tokens only (not a rescan of the whole text every step).
"""

from __future__ import annotations


class NgramIndex:
    __slots__ = ("min_n", "max_n", "tokens", "_last")

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # _last[n - min_n][ngram] = position right after that n-gram's latest occurrence
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens) -> None:
        toks = self.tokens
        for t in new_tokens:
            i = len(toks)  # the new token's position: n-grams ending before it now have a continuation
            toks.append(int(t))
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self._last[n - self.min_n][tuple(toks[i - n:i])] = i

    def sync(self, token_ids: list[int]) -> None:
        """Catch up with an append-only token list (a sequence's prompt + output)."""
        if len(token_ids) > len(self.tokens):
            self.extend(token_ids[len(self.tokens):])

    def match(self) -> int | None:
        """Position whose token followed the latest earlier occurrence of the longest suffix
        n-gram (the occurrence ends before the last token), or None."""
        toks, L = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            j = self._last[n - self.min_n].get(tuple(toks[L - n:]))
            if j is not None:
                return j
        return None

    def propose(self, k: int) -> list[int]:
        """Up to k tokens: the continuation after the match. Where it runs into the end of the
        stream (the match overlaps the text being copied, a loop of period P), it goes on as the
        copy would: proposal j repeats proposal j - P."""
        j = self.match()
        if j is None or k <= 0:
            return []
        cont = self.tokens[j:j + k]
        return [cont[i % len(cont)] for i in range(k)]


def prompt_lookup(tokens, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k proposed tokens for the stream `tokens` (prompt + output), from scratch."""
    index = NgramIndex(min_n, max_n)
    index.extend(tokens)
    return index.propose(k)


def replay(ids: list[int], min_n: int, max_n: int) -> tuple[int, int, int]:
    """Run the proposer at every position of `ids` as decoding would have met it: (positions
    replayed, positions with a match, positions whose first proposed token was the next one)."""
    index = NgramIndex(min_n, max_n)
    index.extend(ids[:min_n])
    matched = hits = 0
    for i in range(min_n, len(ids)):
        j = index.match()
        if j is not None:
            matched += 1
            hits += index.tokens[j] == ids[i]
        index.extend((ids[i],))
    return max(len(ids) - min_n, 0), matched, hits
