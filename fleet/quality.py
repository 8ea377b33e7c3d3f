"""A model version's quality in the field: drift across its devices and accuracy from their labels.

Pure functions over the store's ``quality()`` rows and the manifests in the repository, so the
API, the CLI and the dashboard show the same figures and every one is tested with made-up
numbers. docs/quality.md explains the measures.

- Drift: each device reports a population stability index of what its model sees against the
  calibration data recorded in the signed manifest; a device is *drifting* when its latest
  score for the model version is over the server's threshold (``--drift-threshold``, 0.2).
- Field accuracy: each device reports the cumulative confusion matrix of the labels its
  applications sent back for that model version; the fleet's figure sums the latest matrix of
  every device, then derives accuracy and per-class precision, recall and F1 (a class never
  predicted has precision 0, a class never labelled recall 0, as the converter reports them).
- Converter figures: the ``accuracy`` check of each manifest of that version (one per profile).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_DRIFT_THRESHOLD = 0.2


def sum_confusions(matrices: Iterable[Sequence[Sequence[int]]]) -> list[list[int]]:
    """Element-wise sum; a smaller matrix counts as the top-left corner of a larger one."""
    size = 0
    found = [m for m in matrices if m]
    for m in found:
        size = max(size, len(m))
    total = [[0] * size for _ in range(size)]
    for m in found:
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                total[i][j] += int(v)
    return total


def confusion_metrics(matrix: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and their macro means of a confusion matrix."""
    n = len(matrix)
    labels = sum(sum(row) for row in matrix)
    correct = sum(matrix[i][i] for i in range(n))
    per_class = []
    for c in range(n):
        predicted = sum(matrix[r][c] for r in range(n))
        actual = sum(matrix[c])
        tp = matrix[c][c]
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": c, "precision": precision, "recall": recall, "f1": f1, "support": actual,
                          "predicted": predicted})
    macro = {k: (sum(p[k] for p in per_class) / n if n else 0.0) for k in ("precision", "recall", "f1")}
    return {"labels": labels, "correct": correct, "accuracy": correct / labels if labels else None,
            "per_class": per_class, "macro": macro}


def converter_figures(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the converter measured for one bundle (its manifest's ``validation`` accuracy check)."""
    checks = (manifest.get("validation") or {}).get("checks") or []
    details: Mapping[str, Any] = next((c.get("details") or {} for c in checks if c.get("name") == "accuracy"), {})
    per_class = []
    for label, figures in sorted((details.get("per_class") or {}).items(), key=lambda kv: _int_key(kv[0])):
        per_class.append({"class": _int_key(label), **{k: figures.get(k) for k in ("precision", "recall", "f1",
                                                                                   "support")}})
    return {"profile": manifest.get("profile"), "measured": bool(details.get("measured")) and bool(details.get("labels")),
            "accuracy": details.get("converted_accuracy"), "source_accuracy": details.get("source_accuracy"),
            "drop_points": details.get("drop_points"), "samples": details.get("samples"),
            "data": details.get("data"), "macro": (details.get("macro") or {}).get("converted"),
            "per_class": per_class}


def _int_key(label: Any) -> Any:
    try:
        return int(label)
    except (TypeError, ValueError):
        return label


def drift_summary(rows: Iterable[Mapping[str, Any]], threshold: float) -> dict[str, Any]:
    """Devices reporting drift for a model version, how many are over ``threshold``, median and max."""
    scores = [(r["device_id"], float(r["drift"]["score"])) for r in rows if r.get("drift")]
    values = [s for _, s in scores]
    return {"devices": len(scores), "drifting": sorted(d for d, s in scores if s > threshold),
            "median": statistics.median(values) if values else None, "max": max(values) if values else None,
            "threshold": threshold}


def version_quality(name: str, version: int, rows: Sequence[Mapping[str, Any]],
                    manifests: Iterable[Mapping[str, Any]] = (), *, threshold: float = DEFAULT_DRIFT_THRESHOLD,
                    detail: bool = True) -> dict[str, Any]:
    """The quality document of one model version (the API's answer; see docs/quality.md).

    ``rows``: the store's quality rows of that version. ``manifests``: the manifests of that
    version in the repository (one per profile). ``detail``: include the summed confusion
    matrix, per-class figures and the per-device rows.
    """
    with_feedback = [r for r in rows if r.get("feedback")]
    matrix = sum_confusions(r["feedback"]["confusion"] for r in with_feedback)
    field = confusion_metrics(matrix)
    field["devices"] = len(with_feedback)
    field["unmatched"] = sum(int(r["feedback"].get("unmatched") or 0) for r in with_feedback)
    converter = [converter_figures(m) for m in sorted(manifests, key=lambda m: str(m.get("profile")))]
    measured = [c["accuracy"] for c in converter if c["measured"] and c["accuracy"] is not None]
    baseline = min(measured) if measured else None
    doc: dict[str, Any] = {
        "name": name, "version": version,
        "drift": drift_summary(rows, threshold),
        "field": {k: field[k] for k in ("labels", "correct", "accuracy", "devices", "unmatched", "macro")},
        "converter": converter,
        "converter_accuracy": baseline,
        "accuracy_delta_points": (round((field["accuracy"] - baseline) * 100.0, 3)
                                  if field["accuracy"] is not None and baseline is not None else None),
    }
    if detail:
        doc["field"]["per_class"] = field["per_class"]
        doc["field"]["confusion"] = matrix
        devices = []
        for r in rows:
            fb = r.get("feedback")
            acc = confusion_metrics(fb["confusion"])["accuracy"] if fb else None
            devices.append({"device_id": r["device_id"], "profile": r.get("profile"), "current": r.get("current"),
                            "drift": r.get("drift"), "drifting": bool(r.get("drift")) and
                            float(r["drift"]["score"]) > threshold,
                            "labels": (fb or {}).get("labels"), "accuracy": acc})
        doc["devices"] = devices
    return doc


def group_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """Quality rows by (model name, version), newest version first within a name."""
    out: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((str(r["model_name"]), int(r["model_version"])), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], -kv[0][1])))


__all__ = ["DEFAULT_DRIFT_THRESHOLD", "confusion_metrics", "converter_figures", "drift_summary", "group_rows",
           "sum_confusions", "version_quality"]
