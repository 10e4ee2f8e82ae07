"""Evaluation: classify a labelled set with an artifact and write metrics, figures, a profile of the
set (`imgcls.reporting.dataset_profile`) and a report (single-label, or multi-label for a multi-label
artifact: see `imgcls.reporting.multilabel_metrics`)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from imgcls.config import EvaluateConfig
from imgcls.errors import ConfigError, DataError
from imgcls.inference.registered_model import check_registered_version, registered_model
from imgcls.platform import storage
from imgcls.reporting.dataset_profile import (
    CLASS_BALANCE_FIGURE,
    DATASET_PROFILE_FILE,
    DatasetProfile,
    dataset_markdown,
    profile_dataset,
    summary_line,
)  # fmt: skip

logger = logging.getLogger(__name__)


class EvaluateSummary(BaseModel):
    model_config = {"protected_namespaces": ()}

    output_uri: str
    model_version: str
    images: int
    evaluated: int
    unreadable: int
    accuracy: float = Field(description="Top-1 accuracy; multi-label: exact-set accuracy.")
    seconds: float
    task: str = "multiclass"
    micro_f1: float | None = None
    macro_f1: float | None = None


def _report_markdown(
    metrics: dict[str, Any], summary: EvaluateSummary, class_names: list[str], dataset: DatasetProfile | None = None
) -> str:
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
    lines.append("")
    if dataset is not None:
        lines += dataset_markdown(dataset)
    lines += [
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
    from imgcls.data.listing import check_known_classes, list_labelled
    from imgcls.inference.engine import prediction_batches
    from imgcls.inference.thresholds import resolve_thresholds
    from imgcls.modeling.artifact import read_metadata
    from imgcls.reporting.metrics import classification_report
    from imgcls.reporting.plots import confusion_matrix_heatmap, reliability_diagram

    started = time.perf_counter()
    storage.configure(config.storage)
    config, registered = registered_model(config)
    endpoint_url = config.storage.endpoint_url
    metadata = read_metadata(config.model, endpoint_url)
    if registered is not None:
        check_registered_version(registered, metadata)
    class_names = metadata.class_names
    thresholds = resolve_thresholds(metadata, config.thresholds, config.min_score)
    if thresholds is None and config.min_score is not None:
        raise ConfigError(
            f"--min-score applies to multi-label models only in evaluation (every class's threshold), and model "
            f"{metadata.model_version} is {metadata.task}: its report scores the most probable class. Drop --min-score."
        )
    images = list_labelled(config.data, endpoint_url)
    if images.multilabel and thresholds is None:
        raise DataError(
            f"{config.data} is multi-label (a `labels` column), but model {metadata.model_version} is {metadata.task}: "
            "it picks one class per image, so it cannot be scored on label sets. Evaluate a multi-label model on it, "
            "or this model on a set with one `label` per image."
        )
    check_known_classes(images, class_names, config.data, f"model {metadata.model_version}")
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
    # What the set holds, before how the model does on it: over the model's classes, so that the
    # classes it knows and the set lacks show up.
    label_sets = images.label_sets if images.multilabel else [(label,) for label in images.labels]
    dataset = profile_dataset(images.paths, label_sets, images.multilabel, list(class_names), table)
    logger.info("%s", summary_line(dataset))
    if thresholds is not None:
        return _multilabel(config, metadata, images, thresholds, readable, errored, dataset, started)
    true_by_path = {path: class_names.index(label) for path, label in zip(images.paths, images.labels)}
    true = np.array([true_by_path[path] for path in readable.column("path").to_pylist()], dtype=np.int64)
    probabilities = np.array(readable.column("probabilities").to_pylist(), dtype=np.float64)
    metrics = classification_report(true, probabilities, class_names, config.top_k, config.calibration_bins)
    metrics["unreadable_images"] = errored.num_rows

    output = storage.resolve(config.output, endpoint_url)
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    storage.write_text_atomic(output.join("metrics.json"), json.dumps(metrics, indent=2))
    _write_dataset_profile(output, dataset)
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
        task=metadata.task,
    )
    storage.write_text_atomic(output.join("report.md"), _report_markdown(metrics, summary, class_names, dataset))
    logger.info(
        "accuracy %.4f on %d images (%d unreadable), ECE %.4f; report %s",
        metrics["accuracy"], summary.evaluated, summary.unreadable, calibration["expected_calibration_error"],
        output.join("report.md").uri,
    )  # fmt: skip
    return summary


def _write_dataset_profile(output: storage.Location, dataset: DatasetProfile) -> None:
    from imgcls.reporting.plots import class_balance_chart

    storage.write_text_atomic(output.join(DATASET_PROFILE_FILE), dataset.model_dump_json(indent=2))
    counts = {name: share.images for name, share in dataset.class_balance.items()}
    title = "images carrying each class" if dataset.labels == "multi" else "images per class"
    storage.write_bytes_atomic(output.join(CLASS_BALANCE_FIGURE), class_balance_chart(counts, title))


def _thresholds_source(config: EvaluateConfig, metadata) -> str:
    applied = ["the artifact's" if metadata.thresholds is not None else "0.5 each (the artifact stores none)"]
    if config.min_score is not None:
        applied = [f"min_score {config.min_score:g} for every class"]
    if config.thresholds is not None:
        applied.append("the thresholds setting for " + ("every class" if isinstance(config.thresholds, list)
                                                        else ", ".join(sorted(config.thresholds))))  # fmt: skip
    return ", then ".join(applied)


def _multilabel(config: EvaluateConfig, metadata, images, thresholds: list[float], readable: pa.Table,
                errored: pa.Table, dataset: DatasetProfile, started: float) -> EvaluateSummary:  # fmt: skip
    """Score label sets at the run's thresholds; a single-label set counts each image's one label."""
    from imgcls.reporting import multilabel_report as report
    from imgcls.reporting.multilabel_metrics import multilabel_report, precision_recall_curve
    from imgcls.reporting.plots import confusion_matrix_heatmap, per_class_confusion_grid, precision_recall_curves

    class_names = metadata.class_names
    # Over the model's classes, in its order (the set's own class list may be a subset).
    images.class_names = list(class_names)
    row_of = {path: row for row, path in enumerate(images.paths)}
    paths = readable.column("path").to_pylist()
    truth = images.label_matrix()[[row_of[path] for path in paths]].astype(np.int64)
    probabilities = np.array(readable.column("probabilities").to_pylist(), dtype=np.float64)
    metrics = multilabel_report(truth, probabilities, thresholds, class_names)
    metrics["unreadable_images"] = errored.num_rows
    metrics["thresholds_source"] = _thresholds_source(config, metadata)

    output = storage.resolve(config.output, config.storage.endpoint_url)
    storage.write_text_atomic(output.join("metrics.json"), json.dumps(metrics, indent=2))
    _write_dataset_profile(output, dataset)
    curves = {name: precision_recall_curve(truth[:, column], probabilities[:, column]) for column, name in enumerate(class_names)}
    per_class = metrics["per_class"]
    operating_points = {name: (per_class[name]["recall"], per_class[name]["precision"]) for name in class_names}
    average_precisions = {name: per_class[name]["average_precision"] for name in class_names}
    storage.write_bytes_atomic(output.join("precision_recall.png"),
                               precision_recall_curves(curves, average_precisions, operating_points))  # fmt: skip
    storage.write_bytes_atomic(output.join("per_class_confusion.png"), per_class_confusion_grid(per_class))
    storage.write_bytes_atomic(
        output.join("label_co_occurrence.png"),
        confusion_matrix_heatmap(np.array(metrics["co_occurrence"]["matrix"]), class_names, "true (rows) against predicted labels"),
    )
    mistakes = report.label_mistakes(paths, truth, probabilities, thresholds, class_names, config.mistakes)
    storage.write_parquet_atomic(output.join(report.LABEL_MISTAKES_FILE), mistakes)
    storage.write_parquet_atomic(output.join("skipped_images.parquet"), errored.select(["path", "error"]))
    storage.write_text_atomic(
        output.join("report.md"),
        report.report_markdown(metrics, metadata.model_version, len(images.paths), errored.num_rows, dataset),
    )
    summary = EvaluateSummary(
        output_uri=output.uri, model_version=metadata.model_version, images=len(images.paths),
        evaluated=readable.num_rows, unreadable=errored.num_rows, accuracy=metrics["exact_set_accuracy"],
        seconds=round(time.perf_counter() - started, 3), task="multilabel",
        micro_f1=metrics["micro_avg"]["f1"], macro_f1=metrics["macro_avg"]["f1"],
    )  # fmt: skip
    logger.info(
        "micro-F1 %.4f macro-F1 %.4f exact-set %.4f mAP %s on %d images (%d unreadable); report %s",
        summary.micro_f1, summary.macro_f1, summary.accuracy,
        "n/a" if metrics["mean_average_precision"] is None else f"{metrics['mean_average_precision']:.4f}",
        summary.evaluated, summary.unreadable, output.join("report.md").uri,
    )  # fmt: skip
    return summary
