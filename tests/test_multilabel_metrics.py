"""The numpy multi-label metrics against scikit-learn's on random data, ties and degenerate classes."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    hamming_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from imgcls.reporting.multilabel_metrics import average_precision, multilabel_report, predicted_matrix, roc_auc


def random_case(seed: int, images: int = 200, classes: int = 5, rounded: bool = False):
    generator = np.random.default_rng(seed)
    truth = (generator.random((images, classes)) < generator.uniform(0.1, 0.6, classes)).astype(np.int64)
    # Probabilities that lean towards the truth, so the metrics are neither 0 nor 1.
    probabilities = np.clip(0.35 * truth + 0.65 * generator.random((images, classes)), 0, 1)
    if rounded:  # many tied scores
        probabilities = np.round(probabilities, 1)
    thresholds = generator.uniform(0.3, 0.7, classes)
    return truth, probabilities, thresholds


def assert_matches_scikit_learn(truth, probabilities, thresholds):
    names = [f"class_{index}" for index in range(truth.shape[1])]
    report = multilabel_report(truth, probabilities, list(thresholds), names)
    predicted = predicted_matrix(probabilities, thresholds)
    for average in ("micro", "macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert report[f"{average}_avg"] == pytest.approx({"precision": precision, "recall": recall, "f1": f1}, abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    for column, name in enumerate(names):
        scores = report["per_class"][name]
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((precision[column], recall[column], f1[column]), abs=1e-12)
        assert scores["support"] == support[column]
        if truth[:, column].any():
            assert scores["average_precision"] == pytest.approx(average_precision_score(truth[:, column], probabilities[:, column]), abs=1e-12)
        if 0 < truth[:, column].sum() < len(truth):
            assert scores["roc_auc"] == pytest.approx(roc_auc_score(truth[:, column], probabilities[:, column]), abs=1e-12)
    assert report["exact_set_accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert report["hamming_loss"] == pytest.approx(hamming_loss(truth, predicted), abs=1e-12)
    assert report["micro_average_precision"] == pytest.approx(average_precision_score(truth, probabilities, average="micro"), abs=1e-12)
    assert report["micro_roc_auc"] == pytest.approx(roc_auc_score(truth, probabilities, average="micro"), abs=1e-12)
    return report


@pytest.mark.parametrize("seed", range(5))
def test_random_data_matches_scikit_learn(seed):
    truth, probabilities, thresholds = random_case(seed)
    report = assert_matches_scikit_learn(truth, probabilities, thresholds)
    assert report["macro_roc_auc"] == pytest.approx(roc_auc_score(truth, probabilities, average="macro"), abs=1e-12)
    assert report["mean_average_precision"] == pytest.approx(average_precision_score(truth, probabilities, average="macro"), abs=1e-12)
    assert report["label_cardinality"]["true"] == pytest.approx(truth.sum(axis=1).mean())
    assert report["notes"] == []


def test_tied_scores_match_scikit_learn():
    truth, probabilities, thresholds = random_case(11, rounded=True)
    assert_matches_scikit_learn(truth, probabilities, thresholds)


def test_a_class_with_one_kind_of_truth_has_null_ranking_metrics_and_a_note():
    truth, probabilities, thresholds = random_case(3, images=40, classes=4)
    truth[:, 1] = 0  # no image carries class_1
    truth[:, 3] = 1  # every image carries class_3
    report = assert_matches_scikit_learn(truth, probabilities, thresholds)
    assert report["per_class"]["class_1"]["roc_auc"] is None and report["per_class"]["class_1"]["average_precision"] is None
    assert report["per_class"]["class_3"]["roc_auc"] is None and report["per_class"]["class_3"]["average_precision"] is not None
    assert len(report["notes"]) == 2 and "class_1: none of the 40 images" in report["notes"][0]
    assert "class_3: every one of the 40 images" in report["notes"][1]
    defined = [report["per_class"][name]["roc_auc"] for name in ("class_0", "class_2")]
    assert report["macro_roc_auc"] == pytest.approx(np.mean(defined))
    # scikit-learn's per-class precision/recall/F1 at zero support are 0 (zero_division=0) and count in the macro.
    assert report["per_class"]["class_1"]["recall"] == 0.0


def test_empty_predictions_and_perfect_predictions():
    truth = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    perfect = multilabel_report(truth, truth.astype(float), [0.5] * 3, ["a", "b", "c"])
    assert perfect["exact_set_accuracy"] == 1.0 and perfect["hamming_loss"] == 0.0 and perfect["micro_avg"]["f1"] == 1.0
    assert perfect["images_without_labels"] == {"true": 1, "predicted": 1}
    assert perfect["co_occurrence"]["matrix"] == [[2, 1, 1], [1, 2, 0], [1, 0, 1]]
    nothing = multilabel_report(truth, np.zeros((4, 3)), [0.5] * 3, ["a", "b", "c"])
    assert nothing["micro_avg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert nothing["exact_set_accuracy"] == 0.25 and nothing["label_cardinality"]["predicted"] == 0.0
    assert nothing["per_class"]["a"]["roc_auc"] == 0.5  # every score tied


def test_a_probability_exactly_at_its_threshold_is_predicted():
    np.testing.assert_array_equal(predicted_matrix(np.array([[0.5, 0.49999]], np.float32), np.array([0.5, 0.5])), [[1, 0]])
    assert average_precision(np.array([0, 0]), np.array([0.1, 0.2])) is None
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
