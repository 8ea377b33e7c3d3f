"""Per-interval inference metrics: counts, errors and latency percentiles.

``record`` runs on every request, from many API threads, so it is O(1) under a short lock: the
latencies of the interval go into a fixed numpy buffer, and once more than ``capacity`` arrive in
one interval, reservoir sampling (Algorithm R) keeps a uniform sample of them, so memory stays
bounded on a busy device and the percentiles stay unbiased. Percentiles are computed when the
telemetry loop takes a snapshot, outside the lock, on a copy of the samples.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DEFAULT_CAPACITY = 10_000


class _Interval:
    """The samples of one interval. Not thread-safe on its own: InferenceMetrics holds the lock."""

    __slots__ = ("buf", "stored", "seen", "count", "errors", "total_ms", "max_ms")

    def __init__(self, capacity: int) -> None:
        self.buf = np.empty(capacity, dtype=np.float64)
        self.clear()

    def clear(self) -> None:
        self.stored = 0        # filled slots of buf
        self.seen = 0          # successful latencies offered to the reservoir
        self.count = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0


class InferenceMetrics:
    """Thread-safe, cheap counters and latency samples for the current telemetry interval.

    Only successful inferences contribute latencies: a rejected request (bad shape, no model)
    returns in microseconds and would drag the percentiles down, hiding a slow model.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, clock: Callable[[], float] = time.monotonic,
                 seed: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._current = _Interval(capacity)
        self._started = clock()
        self._total_count = 0
        self._total_errors = 0

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            cur = self._current
            cur.count += 1
            if not ok:
                cur.errors += 1
                return
            cur.total_ms += latency_ms
            if latency_ms > cur.max_ms:
                cur.max_ms = latency_ms
            cur.seen += 1
            if cur.stored < self.capacity:
                cur.buf[cur.stored] = latency_ms
                cur.stored += 1
            else:
                j = self._rng.randrange(cur.seen)
                if j < self.capacity:
                    cur.buf[j] = latency_ms

    def snapshot_and_reset(self) -> dict[str, Any]:
        """The interval that just ended; the next one starts now.

        Keys: ``count`` (requests), ``errors``, ``interval_s``, ``inferences_per_s`` (successful
        ones), ``latency_ms`` with ``p50``/``p95``/``p99``/``mean``/``max`` (None when no
        inference succeeded), ``sampled`` (latencies the percentiles are computed from).
        """
        with self._lock:
            cur = self._current
            samples = cur.buf[:cur.stored].copy()   # at most capacity floats: microseconds
            count, errors, total_ms, max_ms = cur.count, cur.errors, cur.total_ms, cur.max_ms
            cur.clear()
            now = self._clock()
            interval = max(now - self._started, 0.0)
            self._started = now
            self._total_count += count
            self._total_errors += errors
        ok = count - errors
        latency: dict[str, float | None] = {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
        if samples.size:
            p50, p95, p99 = np.percentile(samples, [50, 95, 99])
            latency = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                       "mean": round(total_ms / ok, 3), "max": round(max_ms, 3)}
        return {
            "count": count,
            "errors": errors,
            "interval_s": round(interval, 3),
            "inferences_per_s": round(ok / interval, 3) if interval > 0 else 0.0,
            "latency_ms": latency,
            "sampled": int(samples.size),
        }

    def totals(self) -> dict[str, int]:
        """Requests and errors since the agent started (finished intervals plus the current one)."""
        with self._lock:
            return {"count": self._total_count + self._current.count,
                    "errors": self._total_errors + self._current.errors}
