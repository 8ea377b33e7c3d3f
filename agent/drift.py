"""Drift: does the device see what the model was calibrated on?

The manifest's ``data_profile`` (agent/protocol/datastats.py) holds, per input channel, the
calibration data's decile edges and the share of values in each of the 10 bins, and the
model's output distribution on that data. A :class:`DriftMonitor` bins the real inputs and
outputs of every inference with the same edges and compares the two distributions with the
population stability index: ``score = max(mean PSI over input channels, max PSI over outputs)``
(< 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift).

Cost and memory are bounded whatever the traffic:

* per inference, O(channels) numpy calls: each channel's values go through one
  ``np.searchsorted`` on its 9 inner edges, and one ``np.bincount`` counts all bins at once. A
  channel with more than ``max_values`` values per inference (a camera frame) is read at
  ``max_values`` positions on a regular lattice with a random offset, fixed per model, so a
  224x224 frame costs what a 23x23 one does;
* a sliding window of the last ``window`` inferences (batch rows): a ring holding each
  inference's bin counts (``window`` x bins int32: 40 KB for a 1-channel model and W = 1000)
  and their running sum; a new inference subtracts the one it replaces. No decay constant to
  tune: the score describes exactly the last W inferences.

No report before :data:`MIN_SAMPLES` inferences: a PSI over a handful of inputs is noise.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.protocol import datastats
from agent.protocol.errors import LitefleetError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1000
MIN_SAMPLES = 100
MAX_VALUES = 512
BINS = datastats.BINS


class _Histogram:
    """One tensor profiled as per-channel histograms (an input, or a 'scores' output)."""

    def __init__(self, shape: Sequence[int], edges: Sequence[Sequence[float]], offset: int, *,
                 max_values: int, rng: np.random.Generator) -> None:
        self.offset = offset
        self.channels = len(edges)
        self.width = self.channels * BINS
        self.inner = np.asarray([list(e)[1:-1] for e in edges], dtype=np.float64)
        self.positions: int | None = None      # values per channel read per inference (None: all)
        self._per_row = int(np.prod(shape[1:] if len(shape) >= 2 else shape)) // self.channels
        self._take: slice | None = None
        if self._per_row > max_values:
            # A regular lattice with a random offset, not scattered positions: right after an
            # inference the frame is out of the cache, and a strided read is one the prefetcher
            # follows (measured: about 30% cheaper than sorted random positions, hot or cold). The
            # stride is made coprime with the row length so that it does not keep to a few columns.
            stride = self._per_row // max_values
            row = int(shape[-2]) if len(shape) >= 3 and self.channels > 1 else (int(shape[-1]) if len(shape) >= 2
                                                                                 else 0)
            while stride > 1 and row and math.gcd(stride, row) > 1:
                stride -= 1
            start = int(rng.integers(stride))
            self._take = slice(start, start + stride * max_values, stride)
            self.positions = max_values
        self._offsets = (np.arange(self.channels) * BINS)[None, :, None]

    def counts(self, array: np.ndarray) -> np.ndarray:
        """Per-row bin counts of a batch ``array`` ([N, ...]): shape [N, width]."""
        rows = array.shape[0] if array.ndim >= 2 else 1
        values = np.asarray(array).reshape(rows, self._per_row, self.channels)
        if self._take is not None:
            values = values[:, self._take, :]
        bins = np.empty((rows, self.channels, values.shape[1]), dtype=np.intp)
        for c in range(self.channels):
            bins[:, c] = np.searchsorted(self.inner[c], values[:, :, c], side="right")
        bins += self._offsets
        if rows > 1:
            bins += (np.arange(rows) * self.width)[:, None, None]
        return np.bincount(bins.ravel(), minlength=rows * self.width).reshape(rows, self.width).astype(np.int32)


class _Classes:
    """A class output: the window keeps each inference's winning class, and a count per class."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.totals = np.zeros(classes, dtype=np.int64)

    def winners(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array).reshape(-1, self.classes).argmax(axis=1)


class DriftMonitor:
    """Sliding-window input and output statistics of one model version, and their PSI against its profile."""

    def __init__(self, profile: datastats.DataProfile, input_shapes: Sequence[Sequence[int]],
                 output_shapes: Sequence[Sequence[int]], *, model: dict[str, Any] | None = None,
                 window: int = DEFAULT_WINDOW, max_values: int = MAX_VALUES, seed: int = 0) -> None:
        if window < 1:
            raise ValueError("the drift window must hold at least 1 inference")
        if len(profile.inputs) != len(input_shapes) or len(profile.outputs) != len(output_shapes):
            raise ValueError(f"the data profile describes {len(profile.inputs)} inputs and {len(profile.outputs)} "
                             f"outputs; the model has {len(input_shapes)} and {len(output_shapes)}")
        rng = np.random.default_rng(seed)
        self.model = model
        self.window = window
        self._inputs: list[_Histogram] = []
        self._outputs: list[_Histogram | _Classes] = []
        offset = 0
        for prof, shape in zip(profile.inputs, input_shapes):
            expected = datastats.channel_count(shape)
            if len(prof.channels) != expected:
                raise ValueError(f"input {prof.name!r}: the profile has {len(prof.channels)} channels, the model's "
                                 f"shape {list(shape)} has {expected}")
            part = _Histogram(shape, [c.edges for c in prof.channels], offset, max_values=max_values, rng=rng)
            self._inputs.append(part)
            offset += part.width
        for prof, shape in zip(profile.outputs, output_shapes):
            if prof.kind == "classes":
                if not datastats.is_classes(shape) or len(prof.fractions) != shape[-1]:
                    raise ValueError(f"output {prof.name!r}: the profile has {len(prof.fractions)} classes, the "
                                     f"model's shape is {list(shape)}")
                self._outputs.append(_Classes(len(prof.fractions)))
            else:
                part = _Histogram(shape, [prof.edges or ()], offset, max_values=max_values, rng=rng)
                self._outputs.append(part)
                offset += part.width
        self._histograms = self._inputs + [p for p in self._outputs if isinstance(p, _Histogram)]
        self._classes = [p for p in self._outputs if isinstance(p, _Classes)]
        self._profile = profile
        # The window: per inference, its bin counts (histograms) and its winning classes (-1: empty slot).
        self._ring = np.zeros((window, offset), dtype=np.int32)
        self._totals = np.zeros(offset, dtype=np.int64)
        self._class_ring = np.full((window, len(self._classes)), -1, dtype=np.int32)
        self._pos = 0
        self._seen = 0
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Any, *, window: int = DEFAULT_WINDOW) -> "DriftMonitor | None":
        """A monitor for a loaded model, or None when its manifest has no usable data profile."""
        manifest = model.manifest
        try:
            profile = manifest.data_profile
        except (LitefleetError, AttributeError) as exc:
            log.warning("%s v%s: the manifest's data_profile is unusable (%s); no drift report",
                        model.name, model.version, exc)
            return None
        if profile is None:
            return None
        doc = manifest.doc
        try:
            return cls(profile, [tuple(d["shape"]) for d in doc["inputs"]], [tuple(d["shape"]) for d in doc["outputs"]],
                       model={"name": model.name, "version": model.version}, window=window)
        except ValueError as exc:
            log.warning("%s v%s: %s; no drift report", model.name, model.version, exc)
            return None

    @property
    def seen(self) -> int:
        """Inferences observed since this monitor was made (the model was activated)."""
        return self._seen

    @property
    def memory_bytes(self) -> int:
        """What the window holds, whatever the traffic."""
        return self._ring.nbytes + self._totals.nbytes + self._class_ring.nbytes + \
            sum(c.totals.nbytes for c in self._classes)

    def observe(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """Add one request's real-valued inputs and outputs (each [N, ...] for a batch of N rows)."""
        arrays = list(inputs) + [a for a, p in zip(outputs, self._outputs) if isinstance(p, _Histogram)]
        counts = [p.counts(a) for p, a in zip(self._histograms, arrays)]
        rows = np.concatenate(counts, axis=1) if len(counts) > 1 else counts[0]
        winners = [p.winners(a) for a, p in zip(outputs, self._outputs) if isinstance(p, _Classes)]
        observed = rows.shape[0]
        if observed > self.window:
            rows, winners = rows[-self.window:], [w[-self.window:] for w in winners]
        n = rows.shape[0]
        with self._lock:
            if n == 1:                          # the usual case: one slot, scalar updates
                slot = self._pos
                self._totals -= self._ring[slot]
                self._ring[slot] = rows[0]
                self._totals += rows[0]
                for k, (part, won) in enumerate(zip(self._classes, winners)):
                    old = self._class_ring[slot, k]
                    if old >= 0:
                        part.totals[old] -= 1
                    self._class_ring[slot, k] = won[0]
                    part.totals[won[0]] += 1
            else:
                slots = (self._pos + np.arange(n)) % self.window
                self._totals -= self._ring[slots].sum(axis=0)
                self._ring[slots] = rows
                self._totals += rows.sum(axis=0)
                for k, (part, won) in enumerate(zip(self._classes, winners)):
                    old = self._class_ring[slots, k]
                    np.subtract.at(part.totals, old[old >= 0], 1)
                    self._class_ring[slots, k] = won
                    np.add.at(part.totals, won, 1)
            self._pos = (self._pos + n) % self.window
            self._seen += observed

    def report(self) -> dict[str, Any] | None:
        """The telemetry ``drift`` document, or None before :data:`MIN_SAMPLES` inferences."""
        with self._lock:
            seen = self._seen
            totals = self._totals.copy()
            class_totals = [c.totals.copy() for c in self._classes]
        if seen < MIN_SAMPLES:
            return None
        input_psis: list[float] = []
        for part, prof in zip(self._inputs, self._profile.inputs):
            for c, channel in enumerate(prof.channels):
                start = part.offset + c * BINS
                input_psis.append(channel.psi(totals[start:start + BINS].tolist()))
        class_counts = iter(class_totals)
        output_psis = [prof.psi(next(class_counts).tolist() if isinstance(part, _Classes)
                                else totals[part.offset:part.offset + part.width].tolist())
                       for part, prof in zip(self._outputs, self._profile.outputs)]
        out_psi = max(output_psis) if output_psis else None
        score = datastats.drift_score(input_psis, out_psi)
        return {"method": "psi", "score": round(score, 4),
                "inputs": round(sum(input_psis) / len(input_psis), 4) if input_psis else None,
                "outputs": round(out_psi, 4) if out_psi is not None else None,
                "window": min(seen, self.window), "model": dict(self.model or {})}


__all__ = ["DriftMonitor", "DEFAULT_WINDOW", "MIN_SAMPLES", "MAX_VALUES"]
