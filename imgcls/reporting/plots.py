"""Figures as PNG bytes (matplotlib, headless): training curves, confusion matrix, reliability diagram,
the multi-label figures (precision-recall curves, per-class confusion) and a set's class balance."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (every figure module draws through it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def training_curves(history: list[dict[str, Any]]) -> bytes:
    """Loss and accuracy (micro_f1 for multi-label runs) per epoch, train against validation."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [entry["epoch"] for entry in history]
    score = "micro_f1" if history and "micro_f1" in history[0] else "accuracy"
    for axis, name in zip(axes, ("loss", score)):
        axis.plot(epochs, [entry[name] for entry in history], marker="o", label=f"train {name}")
        if history and f"val_{name}" in history[0]:
            axis.plot(epochs, [entry.get(f"val_{name}") for entry in history], marker="o", label=f"validation {name}")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend()
    return png_bytes(figure)


def confusion_matrix_heatmap(matrix: np.ndarray, class_names: list[str], title: str = "confusion matrix") -> bytes:
    """Rows are true classes, columns predicted; each cell shows its count."""
    plt = pyplot()
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axis.text(column, row, int(matrix[row, column]), ha="center", va="center",
                      color="white" if matrix[row, column] > threshold else "black", fontsize=8)  # fmt: skip
    axis.set_title(title)
    return png_bytes(figure)


def reliability_diagram(bin_confidence: list[float | None], bin_accuracy: list[float | None], bin_counts: list[int],
                        expected_calibration_error: float) -> bytes:  # fmt: skip
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, len(bin_counts) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = [value if value is not None else 0.0 for value in bin_accuracy]
    axis.bar(centres, accuracy, width=1 / len(bin_counts), edgecolor="black", alpha=0.7, label="accuracy")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top-1 score)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"reliability (ECE {expected_calibration_error:.3f})")
    axis.legend(loc="upper left")
    return png_bytes(figure)


def trial_curves(histories: dict[str, list[tuple[int, float]]], metric: str) -> bytes:
    """The tuned metric per epoch, one line per trial: trials ASHA stopped end early."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for trial_id, history in sorted(histories.items()):
        if history:
            axis.plot([epoch for epoch, _ in history], [value for _, value in history], marker="o", label=trial_id)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per trial")
    axis.grid(alpha=0.3)
    if any(histories.values()):
        axis.legend(fontsize="small", ncol=2)
    return png_bytes(figure)


def precision_recall_curves(curves: dict[str, tuple[np.ndarray, np.ndarray] | None],
                            average_precisions: dict[str, float | None],
                            operating_points: dict[str, tuple[float, float]]) -> bytes:  # fmt: skip
    """One precision-recall curve per class (step, as average precision integrates it), its AP in the
    legend and a dot where the class's threshold puts it; classes without positives are left out."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 5.5))
    for name, curve in curves.items():
        if curve is None:
            continue
        precision, recall = curve
        (line,) = axis.step(recall, precision, where="pre", label=f"{name} (AP {average_precisions[name]:.3f})")
        recall_at, precision_at = operating_points[name]
        axis.plot([recall_at], [precision_at], marker="o", color=line.get_color())
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_title("precision-recall per class (dot: at its threshold)")
    axis.grid(alpha=0.3)
    if any(curve is not None for curve in curves.values()):
        axis.legend(fontsize="small", loc="lower left")
    return png_bytes(figure)


def per_class_confusion_grid(per_class: dict[str, dict]) -> bytes:
    """A 2x2 confusion matrix per class (rows: truth no/yes, columns: predicted no/yes)."""
    plt = pyplot()
    names = list(per_class)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.ravel()[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.ravel(), names):
        counts = per_class[name]
        matrix = np.array([[counts["true_negatives"], counts["false_positives"]],
                           [counts["false_negatives"], counts["true_positives"]]])  # fmt: skip
        axis.imshow(matrix, cmap="Blues", vmin=0)
        for row in range(2):
            for column in range(2):
                axis.text(column, row, int(matrix[row, column]), ha="center", va="center",
                          color="white" if matrix[row, column] > matrix.max() / 2 else "black")  # fmt: skip
        axis.set_xticks([0, 1], ["no", "yes"])
        axis.set_yticks([0, 1], ["no", "yes"])
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{name} (t={counts['threshold']:.2f})", fontsize=9)
    figure.tight_layout()
    return png_bytes(figure)


# Beyond this many classes the balance chart drops the names and shows the counts in rank order.
NAMED_BALANCE_CLASSES = 40


def class_balance_chart(counts: dict[str, int], title: str = "images per class") -> bytes:
    """One horizontal bar per class, in the given order, with its count; many classes become a
    ranked profile (largest first), which still shows how uneven they are."""
    plt = pyplot()
    names, values = list(counts), list(counts.values())
    if len(names) > NAMED_BALANCE_CLASSES:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        axis.bar(range(1, len(values) + 1), sorted(values, reverse=True), width=1.0)
        axis.set_xlabel("class rank (largest first)")
        axis.set_ylabel("images")
        axis.set_title(f"{title} ({len(names)} classes)")
        return png_bytes(figure)
    figure, axis = plt.subplots(figsize=(6, max(1.8, 0.32 * len(names) + 0.8)))
    positions = range(len(names))
    axis.barh(positions, values, color="tab:blue")
    axis.set_yticks(positions, names)
    axis.invert_yaxis()  # the first class on top, as in the report's list
    for position, value in zip(positions, values):
        axis.text(value, position, f" {value}", va="center", fontsize=8)
    axis.set_xlim(0, max(values, default=0) * 1.15 + 1)
    axis.set_xlabel("images")
    axis.set_title(title)
    return png_bytes(figure)
