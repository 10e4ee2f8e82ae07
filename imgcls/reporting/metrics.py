"""Classification metrics from labels and probabilities: plain numpy, exact, no framework."""

from __future__ import annotations

import numpy as np

AVERAGED = ("precision", "recall", "f1")


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined, as scikit-learn's zero_division=0)."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted_count = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = _safe_divide(true_positive, predicted_count)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def top_k_accuracy(true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable."""
    k = min(k, probabilities.shape[1])
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(ranked == true[:, None], axis=1))) if len(true) else 0.0


def calibration(true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error of the top-1 score over equal-width confidence bins, with the bins."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edge_i, edge_i+1]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    mean_confidence = [float(c / n) if n else None for c, n in zip(confidence_sum, counts)]
    accuracy = [float(c / n) if n else None for c, n in zip(correct_sum, counts)]
    total = max(len(true), 1)
    error = float(np.sum(np.abs(confidence_sum - correct_sum)) / total)
    return {"expected_calibration_error": error, "bin_edges": edges.tolist(), "bin_counts": counts.tolist(),
            "bin_confidence": mean_confidence, "bin_accuracy": accuracy}  # fmt: skip


def classification_report(true: np.ndarray, probabilities: np.ndarray, class_names: list[str], top_k: int, bins: int) -> dict:
    """Every metric the evaluation report shows."""
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(true, predicted, num_classes)
    scores = per_class_scores(matrix)
    support = scores["support"]
    weights = support / max(support.sum(), 1)
    present = support > 0
    per_class = {
        name: {metric: (int(values[i]) if metric == "support" else float(values[i])) for metric, values in scores.items()}
        for i, name in enumerate(class_names)
    }
    return {
        "images": int(len(true)),
        "accuracy": float(np.mean(predicted == true)) if len(true) else 0.0,
        f"top_{min(top_k, num_classes)}_accuracy": top_k_accuracy(true, probabilities, top_k),
        "per_class": per_class,
        # Classes with no images score 0 on every metric; counting them would say a model that is
        # right on every image present is wrong (precision 0.2 with 2 of 10 classes in the set).
        "macro_avg": {metric: float(np.mean(scores[metric][present])) if present.any() else 0.0 for metric in AVERAGED},
        "macro_avg_all_classes": {metric: float(np.mean(scores[metric])) for metric in AVERAGED},
        "weighted_avg": {metric: float(np.sum(scores[metric] * weights)) for metric in AVERAGED},
        "confusion_matrix": {"class_names": class_names, "matrix": matrix.tolist()},
        "calibration": calibration(true, probabilities, bins),
    }
