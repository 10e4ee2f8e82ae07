"""Multi-label decision thresholds and F1 counts, in plain numpy: the same arrays give the same
answer on every worker and every worker count.

A class is predicted when its probability is at least its threshold. `choose_thresholds` picks,
per class, the threshold that maximises that class's F1 on the validation split:

- Candidates are the class's distinct validation probabilities: predicting "positive" for the
  images whose probability is at least the j-th highest distinct value, for every j.
- The threshold is then put in the middle of the gap below the best cut (halfway between the
  lowest probability predicted positive and the highest one predicted negative, or halfway to 0
  when every image is predicted positive), so it does not sit on a validation image's exact score.
- Ties in F1 go to the lowest threshold (the cut that predicts the most positives: recall first).
- A class with no positive validation image keeps DEFAULT_THRESHOLD.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5


def f1_counts(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class true positives, false positives and false negatives: a (3, classes) array from
    0/1 predictions and targets of shape (images, classes)."""
    predicted = np.asarray(predicted, dtype=bool)
    targets = np.asarray(targets) > 0.5
    return np.stack([
        (predicted & targets).sum(axis=0), (predicted & ~targets).sum(axis=0), (~predicted & targets).sum(axis=0)
    ]).astype(np.float64)  # fmt: skip


def f1_from_counts(true_positives, false_positives, false_negatives):
    """F1 = 2 TP / (2 TP + FP + FN); 0 where there is nothing to count (scikit-learn's zero_division=0)."""
    true_positives, false_positives, false_negatives = (np.asarray(value, np.float64) for value in
                                                        (true_positives, false_positives, false_negatives))  # fmt: skip
    denominator = 2 * true_positives + false_positives + false_negatives
    return np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1e-300), 0.0)


def micro_f1(probabilities: np.ndarray, targets: np.ndarray, thresholds) -> float:
    """Micro-averaged F1 over every (image, class) decision at `thresholds` (one per class, or one for all)."""
    counts = f1_counts(np.asarray(probabilities) >= np.asarray(thresholds), targets).sum(axis=1)
    return float(f1_from_counts(*counts))


def exact_match(probabilities: np.ndarray, targets: np.ndarray, thresholds) -> float:
    """Fraction of images whose whole predicted label set is right (zero-label images included)."""
    if len(targets) == 0:
        return 0.0
    predicted = np.asarray(probabilities) >= np.asarray(thresholds)
    return float(np.mean(np.all(predicted == (np.asarray(targets) > 0.5), axis=1)))


def best_threshold(probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """One class: (threshold, F1 there) by the rule in the module's docstring."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    positives = np.asarray(targets) > 0.5
    total_positives = int(positives.sum())
    if total_positives == 0:
        return DEFAULT_THRESHOLD, float(f1_from_counts(0, (probabilities >= DEFAULT_THRESHOLD).sum(), 0))
    order = np.argsort(-probabilities, kind="stable")
    ordered, ordered_positive = probabilities[order], positives[order]
    # The last position of each run of equal probabilities: the cuts "at least this value".
    cut_ends = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    true_positives = np.cumsum(ordered_positive)[cut_ends]
    predicted = cut_ends + 1
    f1 = 2 * true_positives / (predicted + total_positives)
    # Ties -> the lowest threshold, i.e. the last of the best cuts.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    lowest_positive = ordered[cut_ends[best]]
    highest_negative = ordered[cut_ends[best] + 1] if best + 1 < len(cut_ends) else 0.0
    return float((lowest_positive + highest_negative) / 2.0), float(f1[best])


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> tuple[list[float], list[float]]:
    """Per class: the F1-maximising threshold on (images, classes) probabilities and 0/1 targets,
    and that class's F1 there."""
    probabilities, targets = np.asarray(probabilities), np.asarray(targets)
    chosen = [best_threshold(probabilities[:, k], targets[:, k]) for k in range(probabilities.shape[1])]
    return [threshold for threshold, _ in chosen], [f1 for _, f1 in chosen]
