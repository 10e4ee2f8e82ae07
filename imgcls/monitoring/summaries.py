"""The records monitoring writes: quantile summaries, binned histograms, a run's monitoring section
and its drift test (pydantic, so the run record and the reference profile validate them)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95}
# Reference histograms: deciles of the reference values (or one bin per value when it has this many
# distinct values or fewer, plus one below and one above them all).
REFERENCE_BINS = 10


class Quantiles(BaseModel):
    mean: float | None = None
    p05: float | None = None
    p25: float | None = None
    p50: float | None = None
    p75: float | None = None
    p95: float | None = None

    @classmethod
    def of(cls, values: np.ndarray) -> "Quantiles":
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls()
        points = np.quantile(values, list(QUANTILES.values()))
        return cls(mean=round(float(values.mean()), 6), **{name: round(float(point), 6) for name, point in zip(QUANTILES, points)})


def reference_edges(values: np.ndarray) -> list[float]:
    """Bin edges for a signal, from its reference values: deciles, or for a signal of few distinct
    values (image sizes, a greyscale model's colourfulness) edges around each value, so that any
    value the reference never had lands in a bin of its own."""
    values = np.asarray(values, dtype=np.float64)
    distinct = np.unique(values)
    if len(distinct) <= REFERENCE_BINS:
        gap = 1e-9 * max(1.0, float(np.abs(distinct).max()))
        return [float(distinct[0] - gap), *((distinct[1:] + distinct[:-1]) / 2).tolist(), float(distinct[-1] + gap)]
    deciles = np.quantile(values, np.linspace(0.1, 0.9, REFERENCE_BINS - 1))
    return np.unique(deciles).tolist()


def bin_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """How many values fall in each of the len(edges) + 1 bins (a value equal to an edge goes above it)."""
    return np.bincount(np.searchsorted(np.asarray(edges), np.asarray(values, dtype=np.float64), side="right"),
                       minlength=len(edges) + 1)  # fmt: skip


class ScalarReference(BaseModel):
    """One signal of the reference: its bin edges, the reference images per bin, and its quantiles."""

    edges: list[float]
    counts: list[int]
    quantiles: Quantiles


class DriftSignal(BaseModel):
    """One comparison of the run with the reference. `value` is the effect (Jensen-Shannon divergence
    in bits for histograms, Mahalanobis distance of the means for the embedding); `threshold` the
    larger of a minimum effect and the value reached by chance at this run's and the reference's
    sizes with probability `false_alarm_rate / signals`."""

    statistic: Literal["jensen_shannon", "mahalanobis"]
    value: float
    threshold: float
    p_value: float
    detected: bool


class DriftReport(BaseModel):
    """The run against the artifact's reference profile. `score` is the largest signal value over its
    threshold, so a run is flagged (`detected`) when `score` exceeds `threshold` (1)."""

    status: Literal["ok", "drift", "insufficient_images", "no_reference"]
    detected: bool = False
    score: float | None = None
    threshold: float = 1.0
    images: int = 0
    min_images: int
    false_alarm_rate: float
    reference_images: int | None = None
    reference_source: str | None = None
    signals: dict[str, DriftSignal] = Field(default_factory=dict)
    message: str | None = None


class RunMonitoring(BaseModel):
    """`monitoring` in a run record: what the images this run classified looked like to the model."""

    images: int = Field(description="Readable images this run classified (the signals below are theirs).")
    errored: int
    errored_share: float = Field(description="Share of this run's images that could not be read or decoded.")
    class_shares: dict[str, float] = Field(description="Share of readable images per top-1 class.")
    min_score: float | None = None
    below_min_score_share: float | None = Field(
        default=None, description="Share of readable images whose top score is below min_score (label unknown)."
    )
    score: Quantiles
    margin: Quantiles
    entropy: Quantiles
    image_statistics: dict[str, Quantiles]
    seconds: float = Field(description="Time spent on monitoring in the job's process (summaries and drift test).")


class ReviewRecord(BaseModel):
    """`review` in a run record: the run's most uncertain images, for a person to label."""

    file: str
    rows: int
    ranked_by: Literal["margin", "entropy"]
    copied_to: str | None = None
    copied: int = 0
    copy_skipped: int = 0
