"""Classification metrics, computed with numpy alone.

The converter must not pull in scikit-learn at run time just to count; these functions are
pure so they can be checked against ``sklearn.metrics`` in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def top1(outputs: np.ndarray) -> np.ndarray:
    """The predicted class of each row: argmax over everything but the batch axis."""
    outputs = np.asarray(outputs)
    return outputs.reshape(len(outputs), -1).argmax(axis=1)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the labels (0.0 for no samples)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels have shape {y_true.shape}, predictions {y_pred.shape}")
    return float(np.mean(y_true == y_pred)) if len(y_true) else 0.0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two models predict the same top-1 class."""
    return accuracy(top1(a), top1(b))


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference between two float outputs of the same shape."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """counts[i, j] = samples of class labels[i] predicted as labels[j]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if labels is None:
        labels = np.union1d(y_true, y_pred)
    index = {int(label): i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if int(t) in index and int(p) in index:
            counts[index[int(t)], index[int(p)]] += 1
    return counts


@dataclass(frozen=True)
class ClassReport:
    """Per-class precision, recall, F1 and support, plus their unweighted (macro) means."""

    labels: list[int]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_class": {str(label): {"precision": p, "recall": r, "f1": f, "support": s}
                          for label, p, r, f, s in zip(self.labels, self.precision, self.recall, self.f1, self.support)},
            "macro": dict(self.macro),
        }


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def class_report(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray | None = None) -> ClassReport:
    """Precision, recall and F1 per class (classes from the labels and the predictions).

    A class never predicted has precision 0, a class never present recall 0, as sklearn does
    with ``zero_division=0``; macro averages are plain means over the classes.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if labels is None:
        labels = np.union1d(y_true, y_pred)
    counts = confusion_matrix(y_true, y_pred, labels)
    tp = np.diag(counts).astype(np.float64)
    predicted = counts.sum(axis=0).astype(np.float64)
    actual = counts.sum(axis=1).astype(np.float64)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, actual)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    macro = {"precision": float(precision.mean()) if len(labels) else 0.0,
             "recall": float(recall.mean()) if len(labels) else 0.0,
             "f1": float(f1.mean()) if len(labels) else 0.0}
    return ClassReport(labels=[int(v) for v in labels], precision=precision.tolist(), recall=recall.tolist(),
                       f1=f1.tolist(), support=[int(v) for v in actual], macro=macro)
