"""Request state. No torch here: a seeded sequence's randomness is an integer stream key."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ..sampling_params import SamplingParams
from .spec.state import SpecState
from .spec.strategy import Strategy


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


class Sequence:
    """One generated continuation. `token_ids` holds prompt + output.

    `num_cached_tokens` counts the tokens whose K/V are already in the paged cache (from the
    prefix cache or earlier steps); a step computes `token_ids[num_cached_tokens:]` (chunked
    when long) and, once nothing is left but the last token, samples the next one.
    """

    __slots__ = (
        "seq_id", "request", "index", "token_ids", "num_prompt_tokens", "num_cached_tokens",
        "block_table", "block_hashes", "status", "finish_reason", "stop_reason", "output_logprobs",
        "cumulative_logprob", "rng_stream", "output_text", "emitted_text_len", "prefix_offset",
        "read_offset", "emitted_tokens", "emitted_logprobs", "spec", "spec_token_ids", "stop_search_from",
    )

    def __init__(self, seq_id: int, request: "Request", index: int, prompt_token_ids: list[int]) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the leading full blocks already registered
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.rng_stream: int | None = None  # seeded sampling: the stream its races are keyed on (sampler.race_key)
        self.output_text = ""
        self.emitted_text_len = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_search_from = 0  # stop strings match only past this offset of output_text (min_tokens)
        self.emitted_tokens = 0
        self.emitted_logprobs = 0
        self.spec: SpecState | None = None  # speculating sequences only (engine/spec/)
        # this step's proposal (a proposer fills it before scheduling; verified if the scheduler
        # makes the row a verify row, else dropped)
        self.spec_token_ids: list[int] = []

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, cached={self.num_cached_tokens}, {self.status.value})"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    # EngineCore.add_request stamps arrival_time from its clock.
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_sent: bool = False
    strategy: Strategy = Strategy.PLAIN
    # What every step reads, built once: membership in a list of stop ids cost O(len) per token.
    stop_ids: frozenset[int] = field(init=False)
    min_tokens_block: list[int] | None = None  # EOS + stop ids masked before min_tokens (the runner's)

    def __post_init__(self) -> None:
        self.stop_ids = frozenset(self.params.stop_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
