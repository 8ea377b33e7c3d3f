"""InferenceMetrics: percentiles per interval, bounded memory, thread safety."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.metrics import InferenceMetrics


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_percentiles_counts_and_rate_for_one_interval():
    clock = Clock()
    m = InferenceMetrics(clock=clock)
    for ms in range(1, 101):            # 1..100 ms
        m.record(float(ms), True)
    m.record(0.01, False)               # a rejected request: counted, no latency
    clock.t += 10.0
    snap = m.snapshot_and_reset()
    assert snap["count"] == 101 and snap["errors"] == 1
    assert snap["interval_s"] == 10.0
    assert snap["inferences_per_s"] == 10.0
    lat = snap["latency_ms"]
    assert lat["p50"] == pytest.approx(50.5)
    assert lat["p95"] == pytest.approx(95.05)
    assert lat["p99"] == pytest.approx(99.01)
    assert lat["mean"] == pytest.approx(50.5) and lat["max"] == 100.0


def test_reset_starts_a_new_interval():
    clock = Clock()
    m = InferenceMetrics(clock=clock)
    m.record(500.0, True)
    clock.t += 1
    m.snapshot_and_reset()
    m.record(2.0, True)
    clock.t += 1
    snap = m.snapshot_and_reset()
    assert snap["count"] == 1 and snap["latency_ms"]["p99"] == 2.0 and snap["latency_ms"]["max"] == 2.0
    clock.t += 1
    empty = m.snapshot_and_reset()
    assert empty["count"] == 0 and empty["latency_ms"]["p50"] is None and empty["inferences_per_s"] == 0.0
    assert m.totals() == {"count": 2, "errors": 0}


def test_only_errors_gives_no_latency():
    m = InferenceMetrics()
    m.record(1.0, False)
    snap = m.snapshot_and_reset()
    assert snap["errors"] == 1 and snap["latency_ms"] == {"p50": None, "p95": None, "p99": None,
                                                           "mean": None, "max": None}


def test_reservoir_keeps_memory_bounded_and_percentiles_close():
    """50k samples into a 2k reservoir: p50/p95 of the sample stay close to the true ones."""
    m = InferenceMetrics(capacity=2000, seed=7)
    rng = np.random.default_rng(1)
    values = rng.exponential(10.0, 50_000)
    for v in values:
        m.record(float(v), True)
    snap = m.snapshot_and_reset()
    assert snap["sampled"] == 2000 and snap["count"] == 50_000
    assert snap["latency_ms"]["p50"] == pytest.approx(np.percentile(values, 50), rel=0.1)
    assert snap["latency_ms"]["p95"] == pytest.approx(np.percentile(values, 95), rel=0.1)
    assert snap["latency_ms"]["max"] == pytest.approx(values.max(), abs=1e-3)   # exact, not sampled


def test_concurrent_record_loses_nothing():
    m = InferenceMetrics(capacity=500)
    n_threads, per_thread = 4, 5000

    def work(i: int) -> None:
        for k in range(per_thread):
            m.record(1.0 + i, ok=(k % 10 != 0))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    snaps = []
    while any(t.is_alive() for t in threads):   # snapshots race with record()
        snaps.append(m.snapshot_and_reset())
    for t in threads:
        t.join()
    snaps.append(m.snapshot_and_reset())
    assert sum(s["count"] for s in snaps) == n_threads * per_thread
    assert sum(s["errors"] for s in snaps) == n_threads * per_thread // 10
    assert all(s["sampled"] <= 500 for s in snaps)


def test_record_is_cheap():
    m = InferenceMetrics()
    start = time.perf_counter()
    for _ in range(100_000):
        m.record(3.0, True)
    per_call_us = (time.perf_counter() - start) / 100_000 * 1e6
    assert per_call_us < 20, f"record() took {per_call_us:.1f} us"
