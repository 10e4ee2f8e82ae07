"""Evaluation: classify a labelled set with an artifact and write metrics, figures and a report."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from imgcls.config import EvaluateConfig
from imgcls.errors import DataError
from imgcls.platform import storage

logger = logging.getLogger(__name__)


class EvaluateSummary(BaseModel):
    model_config = {"protected_namespaces": ()}

    output_uri: str
    model_version: str
    images: int
    evaluated: int
    unreadable: int
    accuracy: float
    seconds: float


def _report_markdown(metrics: dict[str, Any], summary: EvaluateSummary, class_names: list[str]) -> str:
    top_key = next(key for key in metrics if key.startswith("top_") and key.endswith("_accuracy"))
    lines = [
        f"# Evaluation of model {summary.model_version}",
        "",
        f"- images: {summary.images} ({summary.evaluated} evaluated, {summary.unreadable} unreadable, "
        "listed in skipped_images.parquet)",
        f"- accuracy: {metrics['accuracy']:.4f}",
        f"- {top_key.replace('_', ' ')}: {metrics[top_key]:.4f}",
        f"- expected calibration error: {metrics['calibration']['expected_calibration_error']:.4f}",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in class_names:
        scores = metrics["per_class"][name]
        lines.append(f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} | {scores['support']} |")
    # Both macro averages: over the classes in this set, and over every class the model knows (absent ones count 0).
    averages = {"macro_avg": "macro avg (classes present)", "macro_avg_all_classes": "macro avg (all classes)",
                "weighted_avg": "weighted avg"}  # fmt: skip
    for average, label in averages.items():
        scores = metrics[average]
        lines.append(f"| *{label}* | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} | {summary.evaluated} |")
    lines += [
        "",
        "## Confusion matrix",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "Counts in [confusion_matrix.json](confusion_matrix.json); rows are true classes, columns predicted.",
        "",
        "## Calibration",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "## Most confident mistakes",
        "",
        "See [mistakes.parquet](mistakes.parquet) (path, true, predicted, score).",
        "",
    ]
    return "\n".join(lines)


def run(config: EvaluateConfig) -> EvaluateSummary:
    from imgcls.data.listing import list_labelled
    from imgcls.inference.engine import prediction_batches
    from imgcls.modeling.artifact import read_metadata
    from imgcls.reporting.metrics import classification_report
    from imgcls.reporting.plots import confusion_matrix_heatmap, reliability_diagram

    started = time.perf_counter()
    storage.configure(config.storage)
    endpoint_url = config.storage.endpoint_url
    metadata = read_metadata(config.model, endpoint_url)
    class_names = metadata.class_names
    images = list_labelled(config.data, endpoint_url)
    unknown = sorted(set(images.class_names) - set(class_names))
    if unknown:
        raise DataError(
            f"{config.data} has class(es) {unknown} that model {metadata.model_version} does not know "
            f"(it knows {class_names}). Evaluate on the classes the model was trained on."
        )
    true_by_path = {path: class_names.index(label) for path, label in zip(images.paths, images.labels)}
    logger.info("evaluating model %s on %d labelled images from %s", metadata.model_version, len(images.paths), config.data)
    # Each image's probability for every class, straight from the model, for top-k accuracy and calibration.
    table = pa.concat_tables(
        list(prediction_batches(config, metadata, images.paths, top_k=len(class_names), output="probabilities"))
    )
    if table.num_rows != len(images.paths):
        raise RuntimeError(f"got {table.num_rows} predictions for {len(images.paths)} images")
    errored = table.filter(pa.compute.is_valid(table.column("error")))
    readable = table.filter(pa.compute.is_null(table.column("error")))
    if readable.num_rows == 0:
        raise DataError(f"None of the {len(images.paths)} images under {config.data} is readable.")
    true = np.array([true_by_path[path] for path in readable.column("path").to_pylist()], dtype=np.int64)
    probabilities = np.array(readable.column("probabilities").to_pylist(), dtype=np.float64)
    metrics = classification_report(true, probabilities, class_names, config.top_k, config.calibration_bins)
    metrics["unreadable_images"] = errored.num_rows

    output = storage.resolve(config.output, endpoint_url)
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    storage.write_text_atomic(output.join("metrics.json"), json.dumps(metrics, indent=2))
    storage.write_text_atomic(output.join("confusion_matrix.json"), json.dumps(metrics["confusion_matrix"], indent=2))
    storage.write_bytes_atomic(output.join("confusion_matrix.png"), confusion_matrix_heatmap(matrix, class_names))
    calibration = metrics["calibration"]
    storage.write_bytes_atomic(
        output.join("reliability.png"),
        reliability_diagram(calibration["bin_confidence"], calibration["bin_accuracy"], calibration["bin_counts"],
                            calibration["expected_calibration_error"]),  # fmt: skip
    )
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: config.mistakes]
    paths = readable.column("path").to_pylist()
    mistakes = pa.table(
        {
            "path": pa.array([paths[i] for i in wrong], pa.string()),
            "true": pa.array([class_names[true[i]] for i in wrong], pa.string()),
            "predicted": pa.array([class_names[predicted[i]] for i in wrong], pa.string()),
            "score": pa.array(confidence[wrong], pa.float32()),
        }
    )
    storage.write_parquet_atomic(output.join("mistakes.parquet"), mistakes)
    storage.write_parquet_atomic(output.join("skipped_images.parquet"), errored.select(["path", "error"]))
    summary = EvaluateSummary(
        output_uri=output.uri,
        model_version=metadata.model_version,
        images=len(images.paths),
        evaluated=readable.num_rows,
        unreadable=errored.num_rows,
        accuracy=metrics["accuracy"],
        seconds=round(time.perf_counter() - started, 3),
    )
    storage.write_text_atomic(output.join("report.md"), _report_markdown(metrics, summary, class_names))
    logger.info(
        "accuracy %.4f on %d images (%d unreadable), ECE %.4f; report %s",
        metrics["accuracy"], summary.evaluated, summary.unreadable, calibration["expected_calibration_error"],
        output.join("report.md").uri,
    )  # fmt: skip
    return summary
