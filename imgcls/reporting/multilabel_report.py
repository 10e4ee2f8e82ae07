"""What a multi-label evaluation writes besides metrics.json: the report's Markdown and the table of
its most confident false positives and false negatives."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from imgcls.reporting.dataset_profile import DatasetProfile, dataset_markdown

LABEL_MISTAKES_FILE = "label_mistakes.parquet"


def label_mistakes(
    paths: list[str], truth: np.ndarray, probabilities: np.ndarray, thresholds: list[float], class_names: list[str],
    limit: int,
) -> pa.Table:  # fmt: skip
    """At most `limit` false positives (a class the image lacks, predicted: highest probability first)
    and `limit` false negatives (a class it carries, missed: lowest probability first)."""
    predicted = np.asarray(probabilities, np.float64) >= np.asarray(thresholds, np.float64)[None, :]
    truth = np.asarray(truth).astype(bool)
    rows: dict[str, list] = {"path": [], "class": [], "probability": [], "threshold": [], "kind": []}
    for kind, mask, sign in (("false_positive", ~truth & predicted, -1.0), ("false_negative", truth & ~predicted, 1.0)):
        images, classes = np.nonzero(mask)
        values = probabilities[images, classes]
        order = np.argsort(sign * values, kind="stable")[:limit]
        rows["path"] += [paths[i] for i in images[order]]
        rows["class"] += [class_names[c] for c in classes[order]]
        rows["probability"] += values[order].tolist()
        rows["threshold"] += [thresholds[c] for c in classes[order]]
        rows["kind"] += [kind] * len(order)
    return pa.table(
        {
            "path": pa.array(rows["path"], pa.string()),
            "class": pa.array(rows["class"], pa.string()),
            "probability": pa.array(rows["probability"], pa.float32()),
            "threshold": pa.array(rows["threshold"], pa.float32()),
            "kind": pa.array(rows["kind"], pa.string()),
        }
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_markdown(
    metrics: dict[str, Any], model_version: str, images: int, unreadable: int, dataset: DatasetProfile | None = None
) -> str:
    micro, macro, weighted = metrics["micro_avg"], metrics["macro_avg"], metrics["weighted_avg"]
    lines = [
        f"# Multi-label evaluation of model {model_version}",
        "",
        f"- images: {images} ({metrics['images']} evaluated, {unreadable} unreadable, listed in skipped_images.parquet)",
        f"- thresholds: {metrics['thresholds_source']}",
        f"- exact-set accuracy: {metrics['exact_set_accuracy']:.4f}",
        f"- Hamming loss: {metrics['hamming_loss']:.4f}",
        f"- labels per image: {metrics['label_cardinality']['true']:.3f} true, "
        f"{metrics['label_cardinality']['predicted']:.3f} predicted",
        f"- images without labels: {metrics['images_without_labels']['true']} true, "
        f"{metrics['images_without_labels']['predicted']} predicted",
        f"- mean average precision: {_number(metrics['mean_average_precision'])} "
        f"(micro {_number(metrics['micro_average_precision'])}); ROC AUC macro {_number(metrics['macro_roc_auc'])} "
        f"(micro {_number(metrics['micro_roc_auc'])})",
        "",
        "| class | threshold | precision | recall | F1 | support | predicted | AP | ROC AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, scores in metrics["per_class"].items():
        lines.append(
            f"| {name} | {scores['threshold']:.3f} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} "
            f"| {scores['support']} | {scores['predicted']} | {_number(scores['average_precision'])} | {_number(scores['roc_auc'])} |"
        )
    for label, scores in (("micro avg", micro), ("macro avg", macro), ("weighted avg", weighted)):
        lines.append(f"| *{label}* | | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} | | | | |")
    if metrics["notes"]:
        lines += ["", "Notes:", "", *[f"- {note}" for note in metrics["notes"]]]
    lines.append("")
    if dataset is not None:
        lines += dataset_markdown(dataset)
    lines += [
        "## Precision-recall curves",
        "",
        "![precision-recall curves](precision_recall.png)",
        "",
        "## Per-class confusion",
        "",
        "![per-class confusion](per_class_confusion.png)",
        "",
        "## True against predicted labels",
        "",
        "![label co-occurrence](label_co_occurrence.png)",
        "",
        "Cell (row i, column j): images that carry class i and were predicted class j (the diagonal: true "
        "positives); counts in metrics.json, `co_occurrence`.",
        "",
        "## Most confident mistakes",
        "",
        f"See [{LABEL_MISTAKES_FILE}]({LABEL_MISTAKES_FILE}) (path, class, probability, threshold, kind): false "
        "positives with the highest probabilities, false negatives with the lowest.",
        "",
    ]
    return "\n".join(lines)
