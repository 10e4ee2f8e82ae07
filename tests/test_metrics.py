import numpy as np
import pytest
from sklearn import metrics as reference

from imgcls.reporting.metrics import calibration, classification_report, confusion_matrix, top_k_accuracy

CLASSES = ["cat", "dog", "owl"]
TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
PROBABILITIES = np.array(
    [
        [0.9, 0.05, 0.05],  # cat -> cat
        [0.6, 0.3, 0.1],  # cat -> cat
        [0.2, 0.7, 0.1],  # cat -> dog
        [0.1, 0.8, 0.1],  # dog -> dog
        [0.5, 0.4, 0.1],  # dog -> cat (dog second)
        [0.1, 0.1, 0.8],  # owl -> owl
        [0.05, 0.05, 0.9],  # owl -> owl
        [0.3, 0.3, 0.4],  # owl -> owl
        [0.1, 0.6, 0.3],  # owl -> dog (owl second)
        [0.25, 0.15, 0.6],  # dog -> owl (dog third)
    ]
)


def test_known_answer():
    report = classification_report(TRUE, PROBABILITIES, CLASSES, top_k=2, bins=10)
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["confusion_matrix"]["matrix"] == [[2, 1, 0], [1, 1, 1], [0, 1, 3]]
    assert report["per_class"]["cat"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3}
    assert report["per_class"]["dog"]["precision"] == pytest.approx(1 / 3)
    assert report["per_class"]["owl"]["recall"] == pytest.approx(3 / 4)
    # Top-2: every row but the last (dog ranked third) has its class in the first two.
    assert report["top_2_accuracy"] == pytest.approx(9 / 10)


def test_matches_scikit_learn():
    predicted = PROBABILITIES.argmax(axis=1)
    report = classification_report(TRUE, PROBABILITIES, CLASSES, top_k=2, bins=10)
    np.testing.assert_array_equal(confusion_matrix(TRUE, predicted, 3), reference.confusion_matrix(TRUE, predicted))
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = reference.precision_recall_fscore_support(TRUE, predicted, average=average, zero_division=0)
        assert report[f"{average}_avg"] == pytest.approx({"precision": precision, "recall": recall, "f1": f1})
    assert top_k_accuracy(TRUE, PROBABILITIES, 2) == pytest.approx(reference.top_k_accuracy_score(TRUE, PROBABILITIES, k=2))


def test_expected_calibration_error_by_hand():
    true = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.95, 0.05], [0.75, 0.25], [0.7, 0.3], [0.1, 0.9]])
    result = calibration(true, probabilities, bins=2)
    # Bin (0.5, 1.0] holds all four: mean confidence 0.825, accuracy 0.75.
    assert result["bin_counts"] == [0, 4]
    assert result["expected_calibration_error"] == pytest.approx(0.075)
    assert result["bin_accuracy"] == [None, 0.75]


TEN_CLASSES = [f"class{index}" for index in range(10)]


def two_of_ten_classes():
    """Images of classes 3 and 7 only, with some predicted as absent classes (false positives there)."""
    true = np.array([3, 3, 3, 3, 7, 7, 7, 7, 7, 3])
    predicted = np.array([3, 3, 7, 0, 7, 7, 7, 9, 3, 3])
    return true, np.eye(10)[predicted] * 0.9 + 0.01


def test_macro_average_counts_only_the_classes_present():
    true, probabilities = two_of_ten_classes()
    predicted = probabilities.argmax(axis=1)
    report = classification_report(true, probabilities, TEN_CLASSES, top_k=3, bins=10)
    present = sorted(set(true.tolist()))
    for key, labels in (("macro_avg", present), ("macro_avg_all_classes", list(range(10)))):
        precision, recall, f1, _ = reference.precision_recall_fscore_support(
            true, predicted, labels=labels, average="macro", zero_division=0
        )
        assert report[key] == pytest.approx({"precision": precision, "recall": recall, "f1": f1}), key
    # Absent classes score 0 on everything, so counting them divides the present classes' sum by 10, not 2.
    for metric in ("precision", "recall", "f1"):
        assert report["macro_avg_all_classes"][metric] == pytest.approx(report["macro_avg"][metric] * 2 / 10)


def test_a_perfect_model_on_two_of_ten_classes_has_a_macro_average_of_one():
    true = np.array([2, 2, 5, 5, 5])
    report = classification_report(true, np.eye(10)[true], TEN_CLASSES, top_k=1, bins=10)
    assert report["macro_avg"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert report["weighted_avg"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert report["macro_avg_all_classes"] == pytest.approx({"precision": 0.2, "recall": 0.2, "f1": 0.2})


def test_the_report_table_shows_both_macro_averages_labelled():
    from imgcls.evaluate import EvaluateSummary, _report_markdown

    true, probabilities = two_of_ten_classes()
    metrics = classification_report(true, probabilities, TEN_CLASSES, top_k=3, bins=10)
    summary = EvaluateSummary(output_uri="out", model_version="v1", images=10, evaluated=10, unreadable=0,
                              accuracy=metrics["accuracy"], seconds=0.1)  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in _report_markdown(metrics, summary, TEN_CLASSES).splitlines()
            if line.startswith("| *")}  # fmt: skip
    assert list(rows) == ["*macro avg (classes present)*", "*macro avg (all classes)*", "*weighted avg*"]
    assert f"| {metrics['macro_avg']['precision']:.4f} |" in rows["*macro avg (classes present)*"]
    assert f"| {metrics['macro_avg_all_classes']['precision']:.4f} |" in rows["*macro avg (all classes)*"]
