"""Multi-label metrics from a 0/1 truth matrix, per-class probabilities and per-class thresholds:
plain numpy, exact, no framework (the tests hold them to scikit-learn's). Undefined values (ranking
metrics of a class with one kind of truth) are None, never a made-up number."""

from __future__ import annotations

import numpy as np

from imgcls.reporting.metrics import AVERAGED, _safe_divide


def predicted_matrix(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """1 where a class's probability is at least its threshold (compared in float64)."""
    return (np.asarray(probabilities, np.float64) >= np.asarray(thresholds, np.float64)[None, :]).astype(np.int64)


def counts_per_class(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """True/false positives/negatives of each class (column)."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    return {
        "true_positives": np.sum(truth & predicted, axis=0),
        "false_positives": np.sum(~truth & predicted, axis=0),
        "false_negatives": np.sum(truth & ~predicted, axis=0),
        "true_negatives": np.sum(~truth & ~predicted, axis=0),
    }


def _precision_recall_f1(true_positives, false_positives, false_negatives) -> dict[str, np.ndarray]:
    true_positives = np.asarray(true_positives, np.float64)
    precision = _safe_divide(true_positives, true_positives + false_positives)
    recall = _safe_divide(true_positives, true_positives + np.asarray(false_negatives, np.float64))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def precision_recall_curve(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(precision, recall) at every distinct score taken as the threshold, from the highest down,
    starting at (1, 0); None when the class has no positive image (recall is undefined)."""
    truth = np.asarray(truth, np.float64)
    if truth.sum() == 0:
        return None
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    ranked_scores, ranked_truth = np.asarray(scores, np.float64)[order], truth[order]
    # The last position of each run of equal scores: a threshold there admits the whole run.
    ends = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
    true_positives = np.cumsum(ranked_truth)[ends]
    admitted = ends + 1.0
    precision = true_positives / admitted
    recall = true_positives / true_positives[-1]
    return np.r_[1.0, precision], np.r_[0.0, recall]


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the step precision-recall curve, sum of (R_n - R_n-1) P_n (scikit-learn's
    definition, no interpolation); None without positives."""
    curve = precision_recall_curve(truth, scores)
    if curve is None:
        return None
    precision, recall = curve
    return float(np.sum(np.diff(recall) * precision[1:]))


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Probability that a positive image scores above a negative one (ties count half), from average
    ranks; None when the images are all positive or all negative."""
    truth = np.asarray(truth).astype(bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="mergesort")
    _, first, size = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat(first + (size + 1) / 2.0, size)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def multilabel_report(truth: np.ndarray, probabilities: np.ndarray, thresholds: list[float], class_names: list[str]) -> dict:
    """Every metric the multi-label evaluation report shows, at the given thresholds."""
    truth = np.asarray(truth).astype(np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    predicted = predicted_matrix(probabilities, np.asarray(thresholds))
    counts = counts_per_class(truth, predicted)
    scores = _precision_recall_f1(counts["true_positives"], counts["false_positives"], counts["false_negatives"])
    support = truth.sum(axis=0)
    micro = _precision_recall_f1(*(counts[name].sum() for name in ("true_positives", "false_positives", "false_negatives")))
    weights = support / support.sum() if support.sum() else np.zeros(len(class_names))
    average_precisions = [average_precision(truth[:, column], probabilities[:, column]) for column in range(len(class_names))]
    aucs = [roc_auc(truth[:, column], probabilities[:, column]) for column in range(len(class_names))]
    notes = []
    for name, positives, area in zip(class_names, support, aucs):
        if area is None:
            kind = "none" if positives == 0 else "every one"
            notes.append(f"{name}: {kind} of the {len(truth)} images carries it, so its ROC AUC is undefined (null)"
                         + (" and so is its average precision" if positives == 0 else ""))  # fmt: skip
    per_class = {}
    for column, name in enumerate(class_names):
        per_class[name] = {
            "threshold": float(thresholds[column]),
            **{metric: float(scores[metric][column]) for metric in AVERAGED},
            "support": int(support[column]),
            "predicted": int(predicted[:, column].sum()),
            "average_precision": average_precisions[column],
            "roc_auc": aucs[column],
            **{count: int(values[column]) for count, values in counts.items()},
        }
    images = len(truth)
    return {
        "task": "multilabel",
        "images": int(images),
        "thresholds": dict(zip(class_names, map(float, thresholds))),
        "micro_avg": {metric: float(micro[metric]) for metric in AVERAGED},
        # Over every class of the model (scikit-learn's macro); classes without images count 0.
        "macro_avg": {metric: float(np.mean(scores[metric])) for metric in AVERAGED},
        "weighted_avg": {metric: float(np.sum(scores[metric] * weights)) for metric in AVERAGED},
        "exact_set_accuracy": float(np.mean(np.all(truth == predicted, axis=1))) if images else 0.0,
        "hamming_loss": float(np.mean(truth != predicted)) if images else 0.0,
        "label_cardinality": {"true": float(truth.sum(axis=1).mean()) if images else 0.0,
                              "predicted": float(predicted.sum(axis=1).mean()) if images else 0.0},  # fmt: skip
        "images_without_labels": {"true": int(np.sum(truth.sum(axis=1) == 0)),
                                  "predicted": int(np.sum(predicted.sum(axis=1) == 0))},  # fmt: skip
        # Means over the classes where each is defined (see notes); micro: all (image, class) pairs pooled.
        "mean_average_precision": _mean_defined(average_precisions),
        "micro_average_precision": average_precision(truth.ravel(), probabilities.ravel()),
        "macro_roc_auc": _mean_defined(aucs),
        "micro_roc_auc": roc_auc(truth.ravel(), probabilities.ravel()),
        "per_class": per_class,
        # Rows: true class; columns: predicted class; cell: images carrying the one and predicted the other.
        "co_occurrence": {"class_names": class_names, "matrix": (truth.T @ predicted).tolist()},
        "notes": notes,
    }
