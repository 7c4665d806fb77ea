"""What the engine hands back and the server sends on: vLLM-shaped request outputs (whole or as
per-step deltas). Below both layers, so neither imports the other for them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # one dict per token: sampled first, then top-N
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    # speculative decoding, cumulative for this sequence: proposed-and-verified / accepted tokens
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def finished(self) -> bool:  # a method, as vLLM's CompletionOutput.finished()
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: dict | None = None

    def merge(self, delta: "RequestOutput") -> None:
        """Fold a streamed delta into this accumulated output."""
        by_index = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            o = by_index.get(d.index)
            if o is None:
                o = CompletionOutput(index=d.index, logprobs=[] if d.logprobs is not None else None)
                self.outputs.append(o)
                by_index[d.index] = o
            o.text += d.text
            o.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                o.logprobs = (o.logprobs or []) + d.logprobs
            if d.cumulative_logprob is not None:
                o.cumulative_logprob = d.cumulative_logprob
            o.finish_reason = d.finish_reason or o.finish_reason
            o.stop_reason = d.stop_reason if d.stop_reason is not None else o.stop_reason
            o.num_draft_tokens = max(o.num_draft_tokens, d.num_draft_tokens)  # cumulative counts
            o.num_accepted_tokens = max(o.num_accepted_tokens, d.num_accepted_tokens)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finished = delta.finished
        if delta.metrics is not None:
            self.metrics = delta.metrics
        self.outputs.sort(key=lambda o: o.index)
