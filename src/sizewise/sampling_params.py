"""Per-request sampling parameters, validated once at the edge of the engine."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .errors import InvalidRequestError


def is_int(v: object) -> bool:
    """An int and not a bool (bool subclasses int: True must not pass for the token id 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _as_list(value: object, param: str, expected: str) -> list:
    """None -> []; any iterable -> a list; anything else -> InvalidRequestError naming `param`."""
    if value is None:
        return []
    try:
        return list(value)
    except TypeError:
        raise InvalidRequestError(f"{param} must be {expected}, got {value!r}", param=param) from None


@dataclass(slots=True)
class SamplingParams:
    """Mirrors vLLM's `SamplingParams` (names and defaults), which mirror OpenAI's API."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # top-N per prompt token (plus the actual one)
    skip_special_tokens: bool = True

    MAX_LOGPROBS = 20
    # Every list a request can send is bounded: the engine reads them at every step.
    MAX_STOP = 16
    MAX_STOP_CHARS = 1024  # the detokenizer holds back len(longest stop) - 1 characters
    MAX_STOP_TOKEN_IDS = 1024
    _INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
    _OPTIONAL = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
    _FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of integer token ids")
        for name in self._INT_FIELDS:  # numpy integers -> int; floats and bools are refused by validate()
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                setattr(self, name, int(v))
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {msg}", param=param)

        for name in self._INT_FIELDS:
            v = getattr(self, name)
            if not (v is None and name in self._OPTIONAL) and not is_int(v):
                raise bad(name, f"must be an integer{' or None' if name in self._OPTIONAL else ''}, got {v!r}")
        for name in self._FLOAT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise bad(name, f"must be a number, got {v!r}")
        if self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}")
        if self.n > 128:
            raise bad("n", f"must be at most 128, got {self.n}")
        if not self.temperature >= 0.0:
            raise bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be -1 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= self.MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {self.MAX_LOGPROBS}], got {v}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "entries must be non-empty strings")
        if len(self.stop) > self.MAX_STOP:
            raise bad("stop", f"at most {self.MAX_STOP} stop strings, got {len(self.stop)}")
        if any(len(s) > self.MAX_STOP_CHARS for s in self.stop):
            raise bad("stop", f"entries must be at most {self.MAX_STOP_CHARS} characters long")
        if len(self.stop_token_ids) > self.MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {self.MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        if not all(map(is_int, self.stop_token_ids)):
            raise bad("stop_token_ids", f"entries must be integer token ids, got {self.stop_token_ids!r}")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise bad("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")
