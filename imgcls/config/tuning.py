"""The `tune:` section of a training config: a Ray Tune search over other config keys."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from imgcls.config.common import StrictModel, metric_mode
from imgcls.errors import clip, shorten

SEARCH_DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


class TuneSettings(StrictModel):
    """A Ray Tune search over JobConfig fields; each trial is a full training run with its own output."""

    search_space: dict[str, dict[str, list[Any]]] = Field(
        description="Dotted config key -> one domain: `{choice: [a, b]}` (random pick), `{grid: [a, b]}` (every "
        "value, times num_samples), `{uniform: [low, high]}`, `{loguniform: [low, high]}` (learning rates), "
        "`{randint: [low, high]}` (high excluded). Example: `train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}`.",
    )
    num_samples: int = Field(default=8, gt=0, description="Trials drawn from the space (each grid value this many times).")
    metric: str = Field(
        default="val_accuracy",
        description="Reported metric that ranks trials, e.g. val_accuracy, val_loss. For multi-label data the "
        "default becomes val_micro_f1 (multi-label runs report micro_f1 and exact_match, not accuracy).",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None, description="Whether `metric` is minimised or maximised. Unset: min for *loss, else max."
    )
    max_concurrent_trials: int | None = Field(
        default=None,
        gt=0,
        description="Trials run at once. Unset: as many as the cluster's CPUs allow with CPU left for Ray Data "
        "(one at a time on 2 CPUs). Each trial gets an equal share of the cluster.",
    )
    asha: bool = Field(default=True, description="Stop poor trials early with ASHA (asynchronous successive halving).")
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(
        default=2.0, gt=1, description="ASHA: keep the top 1/reduction_factor of trials at each rung."
    )

    @field_validator("search_space")
    @classmethod
    def _domains_well_formed(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not value:
            raise ValueError("needs at least one key to search over")
        for key, domain in value.items():
            shown_key = clip(key)
            if key.split(".")[0] in ("tune", "output_dir"):
                raise ValueError(f"{shown_key}: tune.* and output_dir cannot be searched over")
            if len(domain) != 1 or next(iter(domain)) not in SEARCH_DOMAINS:
                raise ValueError(f"{shown_key}: give exactly one of {', '.join(SEARCH_DOMAINS)}, got {shorten(domain)}")
            (kind, values), = domain.items()
            if not values:
                raise ValueError(f"{shown_key}: {kind} needs values")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(bound, (int, float)) for bound in values):
                    raise ValueError(f"{shown_key}: {kind} takes [low, high], got {shorten(values)}")
                # NaN compares false with everything, so it would slip past the checks below.
                if not all(math.isfinite(bound) for bound in values):
                    raise ValueError(f"{shown_key}: {kind} bounds must be finite numbers, got {values}")
                if values[0] >= values[1]:
                    raise ValueError(f"{shown_key}: {kind} needs low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{shown_key}: loguniform needs low > 0, got {values}")
        return value

    def resolved_mode(self) -> str:
        return self.mode or metric_mode(self.metric)
