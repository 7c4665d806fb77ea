"""The `policy:` section of a deployment config (pydantic: it is read from YAML, an edge).

Everything the adaptive router does is set here, and `to_settings()` turns it into the typed
slotted `PolicySettings` the runtime uses. An empty or missing section keeps the static router.

    policy:
      router: adaptive            # static | adaptive
      intent: features            # features | zero_shot (small-model next-token over label words)
      max_difficulty: {small: 2.4, medium: 3.2}   # nats/token of the small model on the prompt
      intent_bias: {math: 0.5, knowledge: 0.2}    # added to the difficulty score, per intent
      copy_weight: 1.0            # copyable prompts are easier: score -= copy_weight * copyability
      kv_high: 0.9                # projected KV use above which a request moves to another tier
      queue_high_ms: null         # queue-estimated latency above which a request moves
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .policy import INTENTS, PolicySettings


class DifficultyThresholds(BaseModel):
    """Highest difficulty score (small model's mean NLL over the prompt, nats/token, after the
    intent bias and copy discount) that each tier is trusted with; above `medium`: large."""

    model_config = ConfigDict(extra="forbid")
    small: float = 2.5
    medium: float = 3.5

    @field_validator("small", "medium")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        # +-inf are meaningful ("nothing is easy enough": the calibration's -inf); NaN compares
        # false with every score and would send every request to the large tier.
        if math.isnan(v):
            raise ValueError("must be a number (or +-inf), not NaN")
        return v


_Finite = Annotated[float, Field(allow_inf_nan=False)]


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    router: Literal["static", "adaptive"] = "static"
    # --- probe
    intent: Literal["features", "zero_shot"] = "features"
    difficulty: bool = True  # run the probe model's prefill over the prompt (mean NLL)
    probe_model: str | None = None  # model name or tier; default: the smallest resident tier
    probe_max_tokens: int = Field(default=512, ge=2)  # the probe reads at most this prompt prefix
    copy_ngram: int = Field(default=3, ge=1, le=8)  # longest n-gram the copyability lookup matches
    # --- tier choice
    max_difficulty: DifficultyThresholds = Field(default_factory=DifficultyThresholds)
    # finite: score = difficulty + bias - copy_weight * copyability, and inf * 0 or a NaN bias is NaN
    intent_bias: dict[Literal["code", "math", "knowledge", "chat"], _Finite] = Field(default_factory=dict)
    copy_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    # --- load
    kv_high: float = Field(default=0.9, gt=0, le=1)
    queue_high_ms: float | None = Field(default=None, gt=0)
    consolidate: bool = True  # join a busy better tier's batch rather than wake an idle cheaper one
    # --- decode strategy (for `auto`)
    pld_min_copyability: float = Field(default=0.3, ge=0, le=1)
    spec_max_batch: int = Field(default=8, ge=1)
    spec_min_acceptance: float = Field(default=0.4, ge=0, le=1)
    allow_draft: bool = False
    # --- telemetry
    ema_alpha: float = Field(default=0.2, gt=0, le=1)
    peak_bandwidth_gbps: float | None = Field(default=None, gt=0)  # None: measured at startup

    def to_settings(self) -> PolicySettings:
        bias = {i: float(self.intent_bias.get(i, 0.0)) for i in INTENTS}
        return PolicySettings(
            intent_mode=self.intent,
            difficulty=self.difficulty,
            probe_model=self.probe_model,
            probe_max_tokens=self.probe_max_tokens,
            copy_ngram=self.copy_ngram,
            max_difficulty_small=self.max_difficulty.small,
            max_difficulty_medium=self.max_difficulty.medium,
            intent_bias=bias,
            copy_weight=self.copy_weight,
            kv_high=self.kv_high,
            queue_high_ms=self.queue_high_ms,
            consolidate=self.consolidate,
            pld_min_copyability=self.pld_min_copyability,
            spec_max_batch=self.spec_max_batch,
            spec_min_acceptance=self.spec_min_acceptance,
            allow_draft=self.allow_draft,
        )
