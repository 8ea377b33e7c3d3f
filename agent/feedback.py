"""Accuracy in the field: labels sent back for earlier predictions, as confusion counts per model version.

A predict answer carries a ``prediction_id``; an application that later learns the truth
posts it to ``/v1/models/{name}:feedback``. The agent remembers the predicted class of the
last ``capacity`` predictions (a ring: memory stays bounded however busy the device is; about
2.6 MB for the default 10,000, ``api.feedback_window``) and,
when a label arrives, counts it in the confusion matrix of the model version that made the
prediction: rows are the true label, columns the predicted class. An id the ring no longer
holds (or never held: ids do not survive a restart) is counted as ``unmatched`` for the model
version being served.

The matrices are cumulative since each version was first served and survive restarts: they
live in ``feedback.json`` in the state directory, replaced atomically by :meth:`flush`, which
the daemon calls once per loop turn (about a second) and at stop; a crash loses at most the
labels of that last second. The most recent :data:`KEEP_VERSIONS` versions of each model are kept.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import InferenceError
from agent.protocol import keys

log = logging.getLogger(__name__)

FEEDBACK_FILE = "feedback.json"
FORMAT = "litefleet.feedback"
DEFAULT_CAPACITY = 10_000
KEEP_VERSIONS = 8


class _Prediction:
    """What the ring remembers of one prediction (or of a batch request: ``predicted`` None)."""

    __slots__ = ("model", "version", "classes", "predicted", "label", "rows")

    def __init__(self, model: str, version: int, classes: int, predicted: int | None, rows: int = 1) -> None:
        self.model = model
        self.version = version
        self.classes = classes
        self.predicted = predicted
        self.label: int | None = None
        self.rows = rows


class _Matrix:
    """Confusion counts of one model version."""

    __slots__ = ("classes", "labels", "unmatched", "confusion", "updated")

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.labels = 0
        self.unmatched = 0
        self.confusion = [[0] * classes for _ in range(classes)]
        self.updated = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "labels": self.labels, "unmatched": self.unmatched,
                "confusion": [list(r) for r in self.confusion], "updated": self.updated}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "_Matrix":
        classes = int(doc["classes"])
        matrix = cls(classes)
        confusion = doc["confusion"]
        if len(confusion) != classes or any(len(r) != classes for r in confusion):
            raise ValueError(f"confusion is not {classes} x {classes}")
        matrix.confusion = [[int(v) for v in row] for row in confusion]
        matrix.labels, matrix.unmatched = int(doc["labels"]), int(doc["unmatched"])
        matrix.updated = float(doc.get("updated", 0.0))
        return matrix


@dataclass(frozen=True)
class LabelResult:
    """The outcome of one label: matched (``predicted``, ``version`` set) or unmatched."""

    prediction_id: str
    label: int
    matched: bool
    predicted: int | None = None
    version: int | None = None
    relabelled: bool = False

    def to_dict(self) -> dict[str, Any]:
        if not self.matched:
            return {"prediction_id": self.prediction_id, "label": self.label, "status": 404,
                    "error": "unknown or expired prediction id"}
        return {"prediction_id": self.prediction_id, "label": self.label, "status": 200,
                "predicted": self.predicted, "correct": self.predicted == self.label,
                "model_version": str(self.version), "relabelled": self.relabelled}


class FeedbackBook:
    """The ring of recent predictions and the per-version confusion matrices (thread-safe)."""

    def __init__(self, path: Path | str | None = None, *, capacity: int = DEFAULT_CAPACITY,
                 keep_versions: int = KEEP_VERSIONS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = Path(path) if path is not None else None
        self.capacity = capacity
        self.keep_versions = keep_versions
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._ring: collections.OrderedDict[str, _Prediction] = collections.OrderedDict()
        self._matrices: dict[str, dict[int, _Matrix]] = {}
        self._dirty = False
        if self.path is not None:
            self._load()

    # predictions -------------------------------------------------------------------------

    def remember(self, model: str, version: int, classes: int, predicted: Sequence[int]) -> tuple[str, list[str]]:
        """Remember one request's predicted classes; return (its prediction_id, one id per row).

        One row: the row's id is the prediction_id. A batch: each row gets its own id, and the
        request's id is remembered only to tell a caller that labels go to the rows.
        """
        rows = [uuid.uuid4().hex for _ in predicted]
        request_id = rows[0] if len(rows) == 1 else uuid.uuid4().hex
        with self._lock:
            for ident, cls in zip(rows, predicted):
                self._put(ident, _Prediction(model, version, classes, int(cls)))
            if len(rows) > 1:
                self._put(request_id, _Prediction(model, version, classes, None, rows=len(rows)))
        return request_id, rows

    def _put(self, ident: str, entry: _Prediction) -> None:
        self._ring[ident] = entry
        while len(self._ring) > self.capacity:
            self._ring.popitem(last=False)

    # labels ------------------------------------------------------------------------------

    def check(self, model: str, items: Sequence[tuple[str, int]]) -> None:
        """Raise InferenceError(400) if a label is out of its prediction's class range, or names a batch.

        Run before :meth:`record`, so a request with one bad label records none.
        """
        with self._lock:
            for ident, label in items:
                entry = self._ring.get(ident)
                if entry is None or entry.model != model:
                    continue
                if entry.predicted is None:
                    raise InferenceError(400, f"prediction {ident} was a batch of {entry.rows} rows: send a label for "
                                              "each row with its id from the answer's prediction_ids")
                if not 0 <= label < entry.classes:
                    raise InferenceError(400, f"label {label} for prediction {ident} is out of range: model {model} "
                                              f"v{entry.version} has classes 0-{entry.classes - 1}")

    def record(self, model: str, active_version: int, active_classes: int,
               items: Sequence[tuple[str, int]]) -> list[LabelResult]:
        """Count each (prediction_id, label); unknown ids count as unmatched for the active version."""
        results = []
        now = time.time()
        with self._lock:
            for ident, label in items:
                entry = self._ring.get(ident)
                if entry is None or entry.model != model or entry.predicted is None:
                    matrix = self._matrix(model, active_version, active_classes)
                    matrix.unmatched += 1
                    matrix.updated = now
                    results.append(LabelResult(ident, label, False))
                    continue
                matrix = self._matrix(model, entry.version, entry.classes)
                relabelled = entry.label is not None
                if relabelled:
                    matrix.confusion[entry.label][entry.predicted] -= 1
                else:
                    matrix.labels += 1
                matrix.confusion[label][entry.predicted] += 1
                matrix.updated = now
                entry.label = label
                results.append(LabelResult(ident, label, True, entry.predicted, entry.version, relabelled))
            self._dirty = True
        return results

    def _matrix(self, model: str, version: int, classes: int) -> _Matrix:
        versions = self._matrices.setdefault(model, {})
        matrix = versions.get(version)
        if matrix is None or matrix.classes != classes:
            matrix = versions[version] = _Matrix(classes)
            for old in sorted(versions)[:-self.keep_versions]:
                del versions[old]
        return matrix

    # reporting ---------------------------------------------------------------------------

    def report(self, model: str, version: int) -> dict[str, Any] | None:
        """The telemetry ``feedback`` document of one model version, or None before its first label."""
        with self._lock:
            matrix = self._matrices.get(model, {}).get(version)
            if matrix is None:
                return None
            return {"model": {"name": model, "version": version}, "labels": matrix.labels,
                    "unmatched": matrix.unmatched, "classes": matrix.classes,
                    "confusion": [list(r) for r in matrix.confusion]}

    # persistence -------------------------------------------------------------------------

    def flush(self) -> bool:
        """Write the matrices if labels arrived since the last write; True if a file was written."""
        if self.path is None:
            return False
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return False
                doc = {"format": FORMAT, "version": 1,
                       "models": {m: {str(v): x.to_dict() for v, x in sorted(vs.items())}
                                  for m, vs in self._matrices.items()}}
                self._dirty = False
            try:
                keys.atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode(), mode=0o640)
            except OSError as exc:
                with self._lock:
                    self._dirty = True
                log.error("cannot write %s (%s); the field labels stay in memory and are retried", self.path, exc)
                return False
        return True

    def _load(self) -> None:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._set_aside(f"cannot be read ({exc})")
            return
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
            self._matrices = {str(m): {int(v): _Matrix.from_dict(x) for v, x in vs.items()}
                              for m, vs in doc["models"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            self._matrices = {}
            self._set_aside(f"is not a feedback file ({exc})")

    def _set_aside(self, why: str) -> None:
        """Keep a damaged file for inspection instead of overwriting it with empty counts."""
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        try:
            self.path.replace(aside)
        except OSError:
            aside = self.path
        log.error("%s %s; field accuracy starts again from zero (the old file is kept as %s)", self.path, why, aside)


def parse_labels(doc: Any) -> tuple[list[tuple[str, int]], bool]:
    """The (prediction_id, label) pairs of a feedback body, and whether it was the list form.

    Raises InferenceError(400) naming what is wrong.
    """
    if not isinstance(doc, dict):
        raise InferenceError(400, 'the feedback body must be a JSON object: {"prediction_id": "...", "label": 3} '
                                  'or {"labels": [{"prediction_id": "...", "label": 3}, ...]}')
    if ("labels" in doc) == ("prediction_id" in doc or "label" in doc):
        raise InferenceError(400, 'send either "prediction_id" with "label", or "labels": [...], not both or neither')
    if "labels" in doc:
        if set(doc) != {"labels"}:
            raise InferenceError(400, f"unknown keys beside \"labels\": {sorted(set(doc) - {'labels'})}")
        items = doc["labels"]
        if not isinstance(items, list) or not items:
            raise InferenceError(400, '"labels" must be a non-empty list of {"prediction_id": "...", "label": N}')
        return [_item(item, f"labels[{i}]") for i, item in enumerate(items)], True
    return [_item(doc, "the body")], False


def _item(item: Any, where: str) -> tuple[str, int]:
    if not isinstance(item, dict) or set(item) != {"prediction_id", "label"}:
        keys_text = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise InferenceError(400, f'{where}: must have exactly "prediction_id" and "label", got {keys_text}')
    ident, label = item["prediction_id"], item["label"]
    if not isinstance(ident, str) or not ident:
        raise InferenceError(400, f"{where}: prediction_id must be the string a predict answer gave")
    if isinstance(label, bool) or not isinstance(label, int):
        raise InferenceError(400, f"{where}: label must be a whole number (the true class index), got {label!r}")
    if label < 0:
        raise InferenceError(400, f"{where}: label {label} is out of range: class indexes start at 0")
    return ident, label


__all__ = ["FeedbackBook", "LabelResult", "parse_labels", "FEEDBACK_FILE", "DEFAULT_CAPACITY"]
