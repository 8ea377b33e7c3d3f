"""The post-activation health watch: pure decisions on made-up clocks and latencies."""

from __future__ import annotations

from agent.config import HealthConfig
from agent.health import HealthWatch, p95

CFG = HealthConfig(window_s=60.0, min_requests=10, max_error_rate=0.1, max_p95_latency_ms=50.0)


def feed(watch: HealthWatch, n: int, latency: float, ok: bool, start: float = 1000.0) -> None:
    for i in range(n):
        watch.record(latency, ok, start + i * 0.01)


def test_watching_until_the_window_ends_then_healthy():
    watch = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    feed(watch, 30, 10.0, True)
    v = watch.verdict(1030.0)
    assert v.state == "watching" and "30 s of the 60 s window left" in v.reason
    v = watch.verdict(1060.0)
    assert v.state == "healthy"
    assert "error rate 0.0% <= 10.0%" in v.reason and "p95 10.0 ms <= bound 50.0 ms" in v.reason
    # Final: later requests do not change it.
    watch.record(1000.0, False, 1061.0)
    assert watch.verdict(1100.0).state == "healthy" and watch.requests == 30


def test_error_rate_breach_names_the_figure_and_the_bound():
    watch = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    feed(watch, 17, 10.0, True)
    feed(watch, 3, 10.0, False)
    v = watch.verdict(1001.0)
    assert v.state == "breach"
    assert "error rate 15.0% (3 of 20 requests)" in v.reason and "max_error_rate 10.0%" in v.reason
    assert v.errors == 3 and v.requests == 20 and abs(v.error_rate - 0.15) < 1e-9


def test_no_error_breach_below_min_requests():
    watch = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    feed(watch, 5, 10.0, False)        # 100% errors, but only 5 of the 10 needed
    assert watch.verdict(1001.0).state == "watching"
    v = watch.verdict(1060.0)
    assert v.state == "healthy" and "fewer than min_requests 10" in v.reason


def test_p95_breach_against_the_configured_bound():
    watch = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    feed(watch, 18, 10.0, True)
    feed(watch, 2, 80.0, True)          # 10% slow: p95 is 80 ms
    v = watch.verdict(1001.0)
    assert v.state == "breach" and v.p95_ms == 80.0
    assert "p95 latency 80.0 ms" in v.reason and "bound 50.0 ms (max_p95_latency_ms)" in v.reason
    # One slow request in twenty is the 95th percentile boundary: 19 fast + 1 slow has p95 = fast.
    ok = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    feed(ok, 19, 10.0, True)
    feed(ok, 1, 80.0, True)
    assert ok.verdict(1001.0).state == "watching"


def test_bound_from_baseline_when_not_configured():
    cfg = HealthConfig(window_s=60.0, min_requests=10, max_error_rate=0.1, max_p95_latency_ms=0.0)
    watch = HealthWatch(cfg, started_at=0.0, baseline_p95_ms=20.0)
    assert watch.p95_bound_ms == 30.0
    feed(watch, 20, 29.0, True, start=0.0)
    assert watch.verdict(1.0).state == "watching"
    feed(watch, 20, 31.0, True, start=1.0)
    v = watch.verdict(2.0)
    assert v.state == "breach" and "1.5 x validated p95 20.0 ms" in v.reason


def test_no_latency_bound_without_config_or_baseline():
    cfg = HealthConfig(window_s=60.0, min_requests=10, max_error_rate=0.1, max_p95_latency_ms=0.0)
    watch = HealthWatch(cfg, started_at=0.0, baseline_p95_ms=None)
    feed(watch, 50, 5000.0, True, start=0.0)
    assert watch.verdict(10.0).state == "watching"
    assert watch.verdict(60.0).state == "healthy"


def test_requests_outside_the_window_are_ignored():
    watch = HealthWatch(CFG, started_at=1000.0, baseline_p95_ms=None)
    for t in (999.0, 1060.5, 2000.0):
        watch.record(10.0, False, t)
    assert watch.requests == 0


def test_p95_nearest_rank():
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
