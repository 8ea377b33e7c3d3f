"""The converter's numpy-only classification metrics agree with scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from converter import metrics


@pytest.fixture(params=[0, 1, 2])
def labels_and_predictions(request):
    """Random 10-class labels and predictions, some classes never predicted or never present."""
    rng = np.random.default_rng(request.param)
    y_true = rng.integers(0, 10, size=300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 8, size=300))
    if request.param == 2:
        y_true = np.where(y_true == 9, 0, y_true)   # class 9 only ever predicted, never present
    return y_true, y_pred


def test_accuracy_matches_sklearn(labels_and_predictions):
    y_true, y_pred = labels_and_predictions
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))


def test_per_class_and_macro_match_sklearn(labels_and_predictions):
    y_true, y_pred = labels_and_predictions
    labels = np.union1d(y_true, y_pred)
    report = metrics.class_report(y_true, y_pred, labels)
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(report.precision, p)
    np.testing.assert_allclose(report.recall, r)
    np.testing.assert_allclose(report.f1, f)
    assert report.support == list(s)
    for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        expected = fn(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        assert report.macro[name] == pytest.approx(expected), name


def test_confusion_matrix_matches_sklearn(labels_and_predictions):
    y_true, y_pred = labels_and_predictions
    labels = np.union1d(y_true, y_pred)
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, labels),
                                  sk.confusion_matrix(y_true, y_pred, labels=labels))


def test_agreement_and_max_abs_error_on_model_outputs():
    a = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6]], dtype=np.float32)
    b = np.array([[0.2, 0.8], [0.3, 0.7], [0.45, 0.55]], dtype=np.float32)
    assert metrics.agreement(a, b) == pytest.approx(2 / 3)
    assert metrics.max_abs_error(a, b) == pytest.approx(0.5)
    assert list(metrics.top1(a)) == [1, 0, 1]


def test_report_serialises_per_class_with_string_keys():
    report = metrics.class_report(np.array([0, 1, 1]), np.array([0, 1, 0]))
    doc = report.to_dict()
    assert set(doc["per_class"]) == {"0", "1"}
    assert doc["per_class"]["1"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
