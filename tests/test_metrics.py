import numpy as np
import pytest
from sklearn import metrics as reference

from imgcls.metrics import calibration, classification_report, confusion_matrix, top_k_accuracy

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
