"""A run against the reference profile: one two-sample test per signal, with thresholds that depend
on both sample sizes, so that an in-distribution run of any size is flagged with probability at most
`false_alarm_rate` (split evenly over the signals, Bonferroni), and a minimum effect, so that a huge
run is not flagged for a difference nobody would act on.

Histograms (predicted class, score, margin, image statistics): the Jensen-Shannon divergence between
the run's histogram and the reference's (Jeffreys-smoothed), against its distribution when both are
drawn from the reference (a parametric bootstrap of multinomial counts). Embedding: Hotelling's
two-sample T^2 on the projected penultimate features, reported as the Mahalanobis distance of the
means, against the F distribution."""

from __future__ import annotations

import zlib

import numpy as np
from scipy import stats

from imgcls.monitoring.profile import ProfileArrays, ReferenceProfile
from imgcls.monitoring.summaries import DriftReport, DriftSignal

# Runs with fewer readable images get `insufficient_images` instead of a verdict.
DEFAULT_MIN_IMAGES = 100
DEFAULT_FALSE_ALARM_RATE = 0.01
# Smallest effects flagged, whatever the sample sizes: a divergence of 0.01 bits is about a tenth
# of the images moving to a neighbouring decile; 0.25 reference standard deviations of the mean.
MIN_DIVERGENCE_BITS = 0.01
MIN_MAHALANOBIS = 0.25
BOOTSTRAP_DRAWS = 4000
# The signals compared; image width and height are one signal each.
HISTOGRAM_SIGNALS = ("class", "score", "margin", "brightness", "contrast", "colourfulness", "width", "height")


def jensen_shannon_bits(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """JS divergence (base 2, 0..1) between distributions along the last axis."""
    middle = (first + second) / 2

    def kullback_leibler(p: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / np.where(middle > 0, middle, 1.0)), 0.0)
        return terms.sum(axis=-1)

    return np.clip((kullback_leibler(first) + kullback_leibler(second)) / 2, 0.0, 1.0)


def _smoothed(counts: np.ndarray) -> np.ndarray:
    return (counts + 0.5) / (counts.sum(axis=-1, keepdims=True) + 0.5 * counts.shape[-1])


def histogram_test(run_counts: np.ndarray, reference_counts: np.ndarray, alpha: float, seed: int) -> DriftSignal:
    run_counts = np.asarray(run_counts, dtype=np.int64)
    reference_counts = np.asarray(reference_counts, dtype=np.int64)
    run_images, reference_images = int(run_counts.sum()), int(reference_counts.sum())
    reference = _smoothed(reference_counts)
    value = float(jensen_shannon_bits(run_counts / run_images, reference))
    generator = np.random.default_rng(seed)
    null_reference = _smoothed(generator.multinomial(reference_images, reference, size=BOOTSTRAP_DRAWS))
    null_run = generator.multinomial(run_images, reference, size=BOOTSTRAP_DRAWS) / run_images
    null = jensen_shannon_bits(null_run, null_reference)
    critical = float(np.quantile(null, 1.0 - alpha))
    threshold = max(MIN_DIVERGENCE_BITS, critical)
    p_value = float((1 + np.count_nonzero(null >= value)) / (BOOTSTRAP_DRAWS + 1))
    return DriftSignal(statistic="jensen_shannon", value=round(value, 6), threshold=round(threshold, 6),
                       p_value=round(p_value, 6), detected=value > threshold)  # fmt: skip


def embedding_test(run_sum: np.ndarray, run_outer: np.ndarray, run_images: int, reference: ProfileArrays,
                   reference_images: int, alpha: float) -> DriftSignal:  # fmt: skip
    """Hotelling's two-sample T^2 with the pooled covariance (the run's from its sums)."""
    dimensions = len(reference.mean)
    total = run_images + reference_images
    run_mean = run_sum / run_images
    run_covariance = (run_outer - run_images * np.outer(run_mean, run_mean)) / max(1, run_images - 1)
    pooled = ((reference_images - 1) * reference.covariance + (run_images - 1) * run_covariance) / (total - 2)
    # A ridge keeps the test defined when the features span fewer directions than the projection.
    pooled = pooled + np.eye(dimensions) * (1e-6 * max(float(np.trace(pooled)) / dimensions, 1e-12))
    difference = run_mean - reference.mean
    squared = float(difference @ np.linalg.solve(pooled, difference))
    scale = run_images * reference_images / total
    denominator_freedom = total - dimensions - 1
    to_f = denominator_freedom / (dimensions * (total - 2))
    p_value = float(stats.f.sf(squared * scale * to_f, dimensions, denominator_freedom))
    critical = float(np.sqrt(stats.f.ppf(1.0 - alpha, dimensions, denominator_freedom) / to_f / scale))
    value = float(np.sqrt(max(squared, 0.0)))
    threshold = max(MIN_MAHALANOBIS, critical)
    return DriftSignal(statistic="mahalanobis", value=round(value, 6), threshold=round(threshold, 6),
                       p_value=round(p_value, 6), detected=value > threshold)  # fmt: skip


def compare(
    profile: ReferenceProfile | None,
    arrays: ProfileArrays | None,
    run_histograms: dict[str, np.ndarray],
    run_images: int,
    embedding_sums: tuple[np.ndarray, np.ndarray] | None,
    min_images: int = DEFAULT_MIN_IMAGES,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> DriftReport:
    """The drift report of a run whose readable images gave `run_histograms` (counts per reference
    bin, and per class under "class") and, with an embedding, (sum, sum of outer products)."""
    common = {"images": run_images, "min_images": min_images, "false_alarm_rate": false_alarm_rate}
    if profile is None:
        return DriftReport(status="no_reference", message="the model artifact has no reference profile "
                           "(trained before imgcls wrote one): retrain to monitor drift", **common)  # fmt: skip
    common.update(reference_images=profile.images, reference_source=profile.source)
    if run_images < min_images:
        return DriftReport(status="insufficient_images", message=f"{run_images} readable images, fewer than the "
                           f"{min_images} a drift test needs (drift_min_images)", **common)  # fmt: skip
    use_embedding = arrays is not None and embedding_sums is not None and run_images + profile.images > len(arrays.mean) + 2
    alpha = false_alarm_rate / (len(HISTOGRAM_SIGNALS) + use_embedding)
    references = {"class": np.asarray(profile.class_counts)}
    references.update({name: np.asarray(profile.scalars[name].counts) for name in HISTOGRAM_SIGNALS if name != "class"})
    signals = {
        name: histogram_test(run_histograms[name], references[name], alpha, seed=zlib.crc32(name.encode()))
        for name in HISTOGRAM_SIGNALS
    }
    if use_embedding:
        signals["embedding"] = embedding_test(*embedding_sums, run_images, arrays, profile.images, alpha)
    score = max(signal.value / signal.threshold for signal in signals.values())
    detected = any(signal.detected for signal in signals.values())
    flagged = [name for name, signal in signals.items() if signal.detected]
    return DriftReport(
        status="drift" if detected else "ok", detected=detected, score=round(score, 4), signals=signals,
        message=f"drift in {', '.join(flagged)}" if flagged else None, **common,
    )  # fmt: skip
