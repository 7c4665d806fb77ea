"""The `policy:` section of a deployment config (pydantic: it is read from YAML, an edge).

Everything the adaptive router does is set here, and `to_settings()` turns it into the typed
slotted `PolicySettings` the runtime uses. An empty or missing section keeps the static router.

    policy:
      router: adaptive            # static | adaptive
      slo_ms: 900                 # end-to-end latency objective (a request's max_latency_ms overrides)
      price_gain: 1.0             # how fast lam (the price of device bandwidth) rises with pressure
      price_deadband: 0.7         # pressure under which lam is 0 (every request on the best tier)
      discipline: fair            # fair (equal device-time shares) | round_robin (one step each)
      quality:                    # fitted by `sizewise calibrate`: NLL gap of each tier to the top
        calibrated_on: demo held-out split, 256 windows
        tiers:
          small: {intercept: 0.4, coef: {difficulty: 0.05}, mean: 0.6}
          medium: {intercept: 0.2, coef: {difficulty: 0.03}, mean: 0.3}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .policy import DISCIPLINES, PLACEMENTS, SIGNALS, TIER_ORDER, PolicySettings, QualityPredictor, TierFit

_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Signal = Literal[SIGNALS]  # type: ignore[valid-type]
# Keys of the threshold policy this objective replaced: named in the error, not "extra forbidden".
_REPLACED = ("max_difficulty", "intent_bias", "copy_weight", "queue_high_ms", "consolidate")


class TierFitConfig(BaseModel):
    """Predicted NLL gap (nats/token) of one tier to the top tier:
    max(0, intercept + sum coef[signal] * signal); `mean` is used when a signal is missing."""

    model_config = ConfigDict(extra="forbid")
    intercept: _Finite
    coef: dict[_Signal, _Finite] = Field(default_factory=dict)
    mean: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibrated_on: str | None = None  # which text the fit was measured on
    tiers: dict[Literal[TIER_ORDER], TierFitConfig] = Field(min_length=1)  # type: ignore[valid-type]
    report: dict | None = None  # held-out error per signal set (what calibration measured; informative)

    def to_predictor(self) -> QualityPredictor:
        return QualityPredictor({t: TierFit(f.intercept, dict(f.coef), f.mean) for t, f in self.tiers.items()})

    @classmethod
    def from_predictor(cls, pred: QualityPredictor, calibrated_on: str | None = None,
                       report: dict | None = None) -> "QualityConfig":
        return cls(calibrated_on=calibrated_on, report=report, tiers={
            t: TierFitConfig(intercept=f.intercept, coef=dict(f.coef), mean=f.mean) for t, f in pred.tiers.items()})


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    router: Literal["static", "adaptive"] = "static"
    # --- probe
    intent: Literal["features", "zero_shot"] = "features"
    difficulty: bool = True  # run the probe model's prefill over the prompt (mean NLL)
    probe_model: str | None = None  # model name or tier; default: the smallest resident tier
    probe_max_tokens: int = Field(default=512, ge=2)  # the probe reads at most this prompt prefix
    probe_max_ms: float = Field(default=10.0, gt=0, allow_inf_nan=False)  # skip the model probe if it would be later
    always_probe: bool = False  # measure difficulty even when it could not change the decision (observability)
    copy_ngram: int = Field(default=3, ge=1, le=8)  # longest n-gram the copyability lookup matches
    # --- the objective: min predicted loss + lam * bytes, among tiers meeting the SLO
    quality: QualityConfig | None = None  # None: a prior that keeps quality first until calibrated
    slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    price_gain: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    price_deadband: float = Field(default=0.7, ge=0, lt=1)
    kv_high: float = Field(default=0.9, gt=0, le=1)
    discipline: Literal[DISCIPLINES] = "fair"  # type: ignore[valid-type]
    # --- the capacity plan (placement: plan): tiers and shares of `auto` traffic from measured costs
    placement: Literal[PLACEMENTS] = "plan"  # type: ignore[valid-type]
    util_target: float = Field(default=0.85, gt=0, lt=1)  # the plan keeps predicted load utilisation under this
    # where the tiers a plan leaves would wait (a CPU): move their running requests down too, their
    # tokens so far as the cheaper tier's prompt (off: on the cpu-measured virtual device it lowered
    # attainment at 1x-2x; docs/routing.md)
    move_running: bool = False
    # unigram statistics of the family's text (JSON written by `sizewise calibrate`), for the surprisal
    # signal; a relative path is read from the config file's directory
    token_stats: str | None = None
    # --- decode strategy (for `auto`)
    pld_min_copyability: float = Field(default=0.3, ge=0, le=1)
    spec_max_batch: int = Field(default=8, ge=1)
    spec_min_acceptance: float = Field(default=0.4, ge=0, le=1)
    allow_draft: bool = False
    # --- telemetry
    ema_alpha: float = Field(default=0.2, gt=0, le=1)
    peak_bandwidth_gbps: float | None = Field(default=None, gt=0)  # None: measured at startup

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data):
        if isinstance(data, dict):
            old = [k for k in _REPLACED if k in data]
            if old:
                raise ValueError(
                    f"{', '.join(old)}: the threshold policy was replaced by one objective (predicted quality loss "
                    f"+ a load price under the SLO); remove these keys and run `sizewise calibrate --config FILE` "
                    f"to fit `policy.quality`")
        return data

    def to_settings(self) -> PolicySettings:
        return PolicySettings(
            intent_mode=self.intent,
            difficulty=self.difficulty,
            probe_model=self.probe_model,
            probe_max_tokens=self.probe_max_tokens,
            probe_max_ms=self.probe_max_ms,
            always_probe=self.always_probe,
            copy_ngram=self.copy_ngram,
            quality=self.quality.to_predictor() if self.quality is not None else None,
            slo_ms=self.slo_ms,
            price_gain=self.price_gain,
            price_deadband=self.price_deadband,
            kv_high=self.kv_high,
            discipline=self.discipline,
            pld_min_copyability=self.pld_min_copyability,
            spec_max_batch=self.spec_max_batch,
            spec_min_acceptance=self.spec_min_acceptance,
            allow_draft=self.allow_draft,
            placement=self.placement,
            util_target=self.util_target,
            move_running=self.move_running,
            token_stats=_load_token_stats(self.token_stats) if self.token_stats else None,
        )


def _load_token_stats(path: str):
    import json
    from pathlib import Path

    from .probe import TokenStats

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"policy.token_stats {path!r}: cannot read it ({e}); run `sizewise calibrate` to write "
                         f"it, or remove the key") from None
    try:
        return TokenStats.from_json(data)
    except ValueError as e:
        raise ValueError(f"policy.token_stats {path!r}: {e}") from None
