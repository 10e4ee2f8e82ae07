"""Multi-label evaluation through the real CLI, in the job's own process: metrics.json against
scikit-learn on probabilities recomputed from the Keras model, the figures, the false positive and
negative table, threshold overrides, and the sets and models it refuses (exit 2)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from multilabel_factory import (
    CLASS_NAMES,
    THRESHOLDS,
    probabilities_from_keras,
    write_colour_images,
    write_labels_csv,
)  # fmt: skip
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    hamming_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)  # fmt: skip

from imgcls import cli


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """36 images with label sets (some empty) in a CSV manifest, plus one unreadable row."""
    root = tmp_path_factory.mktemp("colour_labelled")
    truth = write_colour_images(root / "images", 36, seed=8)
    (root / "images" / "broken.png").write_bytes(b"not a png")
    manifest = write_labels_csv(root / "labels.csv", {**truth, str(root / "images" / "broken.png"): ("red",)})
    return manifest, truth


def evaluate(model: str, data: str, output, *arguments: str) -> int:
    return cli.main(["evaluate", "--model", model, "--data", data, "--output", str(output), *arguments])


def truth_matrix(truth: dict[str, tuple[str, ...]]) -> np.ndarray:
    return np.array([[name in names for name in CLASS_NAMES] for names in truth.values()], dtype=np.int64)


def assert_metrics_match_scikit_learn(metrics: dict, truth: np.ndarray, probabilities: np.ndarray, thresholds: list[float]):
    predicted = (probabilities.astype(np.float64) >= np.array(thresholds)).astype(np.int64)
    for average in ("micro", "macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert metrics[f"{average}_avg"] == pytest.approx({"precision": precision, "recall": recall, "f1": f1}, abs=1e-9)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    for column, name in enumerate(CLASS_NAMES):
        scores = metrics["per_class"][name]
        assert (scores["precision"], scores["recall"], scores["f1"], scores["support"]) == pytest.approx(
            (precision[column], recall[column], f1[column], support[column]), abs=1e-9)  # fmt: skip
        # The job passes probabilities on as float32 Arrow lists: ranking metrics agree to float32 rounding.
        assert scores["average_precision"] == pytest.approx(average_precision_score(truth[:, column], probabilities[:, column]), abs=1e-6)
        assert scores["roc_auc"] == pytest.approx(roc_auc_score(truth[:, column], probabilities[:, column]), abs=1e-6)
    assert metrics["exact_set_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(truth, predicted))
    assert metrics["label_cardinality"] == pytest.approx({"true": truth.sum(1).mean(), "predicted": predicted.sum(1).mean()})
    assert metrics["images_without_labels"] == {"true": int((truth.sum(1) == 0).sum()), "predicted": int((predicted.sum(1) == 0).sum())}
    return predicted


def test_multilabel_evaluation_matches_scikit_learn(colour_artifact, labelled, tmp_path, capsys):
    manifest, truth = labelled
    output = tmp_path / "report"
    assert evaluate(colour_artifact, manifest, output) == 0
    assert "micro-F1" in capsys.readouterr().out
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["images"] == 36 and metrics["unreadable_images"] == 1
    assert metrics["thresholds"] == dict(zip(CLASS_NAMES, THRESHOLDS))
    paths = list(truth)
    probabilities = probabilities_from_keras(colour_artifact, paths)
    matrix = truth_matrix(truth)
    predicted = assert_metrics_match_scikit_learn(metrics, matrix, probabilities, THRESHOLDS)
    assert 0 < metrics["micro_avg"]["f1"] < 1 and metrics["images_without_labels"]["true"] > 0  # a realistic set
    assert metrics["co_occurrence"]["matrix"] == (matrix.T @ predicted).tolist()
    for figure in ("precision_recall.png", "per_class_confusion.png", "label_co_occurrence.png"):
        with Image.open(output / figure) as image:
            assert image.format == "PNG"
            image.verify()
    mistakes = pq.read_table(output / "label_mistakes.parquet").to_pylist()
    positives = [(row["path"], row["class"]) for row in mistakes if row["kind"] == "false_positive"]
    negatives = [(row["path"], row["class"]) for row in mistakes if row["kind"] == "false_negative"]
    index = {path: row for row, path in enumerate(paths)}
    column = {name: position for position, name in enumerate(CLASS_NAMES)}
    assert sorted(positives) == sorted((paths[i], CLASS_NAMES[c]) for i, c in zip(*np.nonzero((matrix == 0) & (predicted == 1))))
    assert sorted(negatives) == sorted((paths[i], CLASS_NAMES[c]) for i, c in zip(*np.nonzero((matrix == 1) & (predicted == 0))))
    assert positives and negatives
    fp_scores = [probabilities[index[path], column[name]] for path, name in positives]
    assert fp_scores == sorted(fp_scores, reverse=True)  # most confident first
    fn_scores = [probabilities[index[path], column[name]] for path, name in negatives]
    assert fn_scores == sorted(fn_scores)
    report = (output / "report.md").read_text()
    for link in ("precision_recall.png", "per_class_confusion.png", "label_co_occurrence.png", "label_mistakes.parquet"):
        assert f"({link})" in report
    assert "| red |" in report and "exact-set accuracy" in report
    assert pq.read_table(output / "skipped_images.parquet").column("path").to_pylist()[0].endswith("broken.png")
    # The profile counts every listed image, the unreadable one (labelled red) included.
    listed = [*truth.values(), ("red",)]
    profile = json.loads((output / "dataset_profile.json").read_text())
    assert (profile["labels"], profile["images"], profile["readable"], profile["unreadable"]) == ("multi", 37, 36, 1)
    assert {name: share["images"] for name, share in profile["class_balance"].items()} == {
        name: sum(name in names for names in listed) for name in CLASS_NAMES}  # fmt: skip
    assert profile["images_without_labels"] == sum(not names for names in listed) > 0
    assert profile["mean_labels_per_image"] == pytest.approx(sum(map(len, listed)) / 37, abs=1e-6)
    assert profile["duplicates"]["groups"] == 0
    assert "## Dataset" in report and "![class balance](class_balance.png)" in report
    with Image.open(output / "class_balance.png") as image:
        image.verify()


def test_evaluation_thresholds_follow_min_score_then_the_thresholds_setting(colour_artifact, labelled, tmp_path):
    manifest, truth = labelled
    output = tmp_path / "report"
    assert evaluate(colour_artifact, manifest, output, "--min-score", "0.3", "--set", "thresholds={green: 0.8}") == 0
    metrics = json.loads((output / "metrics.json").read_text())
    thresholds = [0.3, 0.8, 0.3]
    assert metrics["thresholds"] == dict(zip(CLASS_NAMES, thresholds))
    assert "min_score 0.3" in metrics["thresholds_source"] and "green" in metrics["thresholds_source"]
    assert_metrics_match_scikit_learn(metrics, truth_matrix(truth), probabilities_from_keras(colour_artifact, list(truth)), thresholds)


def test_a_multilabel_model_on_a_single_label_set_scores_each_label_as_a_set(colour_artifact, labelled, tmp_path):
    _, truth = labelled
    single = {path: names for path, names in truth.items() if len(names) == 1}
    manifest = tmp_path / "single.csv"
    manifest.write_text("path,label\n" + "".join(f"{path},{names[0]}\n" for path, names in single.items()))
    output = tmp_path / "report"
    assert evaluate(colour_artifact, str(manifest), output) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["images"] == len(single) and metrics["label_cardinality"]["true"] == 1.0
    assert_metrics_match_scikit_learn(metrics, truth_matrix(single), probabilities_from_keras(colour_artifact, list(single)), THRESHOLDS)


def test_refused_sets_models_and_settings_exit_2(colour_artifact, tiny_artifact, labelled, tmp_path, capsys):
    manifest, truth = labelled
    cases = [
        # A single-label model picks one class: it cannot be scored on label sets.
        ((tiny_artifact, manifest), "is multi-label (a `labels` column), but model"),
        ((colour_artifact, write_labels_csv(tmp_path / "zebra.csv", {**truth, next(iter(truth)): ("red", "zebra")})),
         "has class(es) ['zebra'] that model"),
        ((colour_artifact, manifest, "--set", "thresholds=[0.5]"), "lists 1 value(s), but model"),
        ((tiny_artifact, manifest, "--min-score", "0.5"), "--min-score applies to multi-label models only"),
    ]  # fmt: skip
    for arguments, message in cases:
        assert evaluate(arguments[0], arguments[1], tmp_path / "out", *arguments[2:]) == 2, message
        error = capsys.readouterr().err.strip()
        assert message in error and "Traceback" not in error and "\n" not in error, error
    assert not (tmp_path / "out").exists()
