"""Anomalies against a device's own history (fleet/anomaly.py) and the alerts they raise (fleet/alerts.py).

The detector is pure and judged on made-up series; the alert test runs it through the real
alert engine over a real SQLite store filled by the store's own ingest path (``write_batch``),
as the server does.
"""

from __future__ import annotations

import random
import time

import pytest

from fleet.alerts import AlertEngine
from fleet.anomaly import AnomalyConfig, detect, detect_all, score, values_of
from fleet.store import IngestBatch, open_store

CFG = AnomalyConfig()
PERIOD = 30.0   # the agent's default telemetry interval


def series(values: list[float], t0: float = 1_700_000_000.0) -> list[tuple[float, float]]:
    return [(t0 + i * PERIOD, v) for i, v in enumerate(values)]


def noisy(n: int, level: float, sd: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sd) for _ in range(n)]


def first_alarm(s: list[tuple[float, float]], metric: str) -> tuple[int, object] | None:
    """The first point at which the detector, fed the series as it arrives, reports an anomaly."""
    for end in range(1, len(s) + 1):
        found = detect(s[:end], metric, CFG)
        if found is not None:
            return end - 1, found
    return None


@pytest.mark.parametrize("metric, level, sd", [("p95_ms", 5.0, 0.4), ("temperature_c", 55.0, 0.3),
                                               ("memory_percent", 40.0, 0.5), ("error_rate", 0.02, 0.005)])
def test_normal_noisy_series_never_alarm(metric, level, sd):
    for seed in range(25):
        assert first_alarm(series(noisy(120, level, sd, seed)), metric) is None, (metric, seed)


def test_a_latency_spike_is_caught_after_it_persists_and_says_how_far_and_since_when():
    values = noisy(40, 5.0, 0.4, seed=1) + [24.0, 26.0, 25.0, 27.0] + noisy(10, 5.0, 0.4, seed=2)
    s = series(values)
    index, found = first_alarm(s, "p95_ms")
    assert index == 42                              # the third anomalous interval in a row
    assert found.since == s[40][0] and found.points == 3
    assert found.latest.value == 25.0 and found.latest.median == pytest.approx(5.0, abs=0.3)
    assert found.latest.z > 20
    text = found.describe("cam-3")
    assert text.startswith("cam-3: p95 latency 25.00 ms is far above its normal 5.")
    assert "robust z" in text and "for 3 interval(s)" in text
    # Back to normal: the anomaly ends at the first normal interval.
    assert detect(s[:44], "p95_ms", CFG).points == 4 and detect(s[:45], "p95_ms", CFG) is None


def test_two_slow_intervals_are_not_an_anomaly():
    values = noisy(40, 5.0, 0.4, seed=3) + [30.0, 30.0] + noisy(20, 5.0, 0.4, seed=4)
    assert first_alarm(series(values), "p95_ms") is None


def test_a_temperature_climb_is_caught_early_then_becomes_the_new_normal():
    rng = random.Random(5)
    values = [55.0 + rng.gauss(0, 0.3) for _ in range(40)] + [55.0 + i + rng.gauss(0, 0.3) for i in range(1, 21)]
    values += [75.0 + rng.gauss(0, 0.3) for _ in range(40)]
    s = series(values)
    index, found = first_alarm(s, "temperature_c")
    assert 42 <= index <= 46                        # within a few degrees of the climb's start
    assert found.latest.value > found.latest.median + 2
    # A device that stays at its new temperature is normal for itself after a while (the fixed
    # limit of the temperature rule still covers an absolute breach).
    assert detect(s, "temperature_c", CFG) is None


def test_a_flat_series_does_not_turn_tiny_noise_into_an_alarm():
    """Identical readings give MAD 0: the floor keeps a 0.3 °C or 0.02 ms wobble from looking infinite."""
    temps = [55.0] * 40 + [55.3, 55.4, 55.3, 55.4]
    assert detect(series(temps), "temperature_c", CFG) is None
    p95 = [5.00] * 40 + [5.02, 5.03, 5.02, 5.03]
    assert detect(series(p95), "p95_ms", CFG) is None
    points = score(series(temps), "temperature_c", CFG)
    assert all(p.mad >= 0.5 for p in points)


def test_error_rate_comes_from_intervals_with_traffic_and_a_burst_is_caught():
    rows = [{"ts": 1000.0 + i * PERIOD, "count": 100, "errors": 1 + (i % 3 == 0)} for i in range(40)]
    rows += [{"ts": 3000.0 + i * PERIOD, "count": 0, "errors": 0} for i in range(5)]      # idle: no rate
    rows += [{"ts": 4000.0 + i * PERIOD, "count": 100, "errors": 30} for i in range(3)]
    rates = values_of(rows, "error_rate")
    assert len(rates) == 43 and rates[-1] == (4000.0 + 2 * PERIOD, 0.3)
    found = detect_all(rows, CFG)["error_rate"]
    assert found is not None and found.since == 4000.0 and "error rate 30.0 %" in found.describe("cam-1")


def test_too_little_history_is_not_judged():
    assert detect(series([5.0] * 5 + [50.0] * 4), "p95_ms", CFG) is None


# Through the alert engine -------------------------------------------------------------------

def telemetry_doc(p95: float, temp: float, *, count: int = 100, errors: int = 0) -> dict:
    """A telemetry DOC as agent/telemetry.py ``collect()`` makes it (the parts the store reads)."""
    return {"schema": 1, "type": "telemetry", "model": {"name": "digits", "version": 3, "sha256": "ab" * 32},
            "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": "xnnpack"},
            "inference": {"count": count, "errors": errors, "interval_s": PERIOD, "inferences_per_s": count / PERIOD,
                          "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.2}},
            "system": {"cpu_percent": 30.0, "temperature_c": temp, "memory_total_bytes": 1000,
                       "memory_available_bytes": 600}}


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "fleet.db"))
    s.migrate()
    yield s
    s.close()


def birth(device_id: str, ts: float) -> dict:
    return {"v": 1, "state": "online", "device_id": device_id, "ts": ts, "fleet": "plant", "profile": "rpi4-cpu",
            "active_model": {"name": "digits", "version": 3, "sha256": "ab" * 32}}


def test_the_alert_engine_raises_and_closes_anomaly_alerts_for_the_right_device_and_metric(store):
    now = time.time()
    start = now - 50 * PERIOD
    rng = random.Random(9)
    batch = IngestBatch(statuses=[(d, birth(d, start)) for d in ("cam-1", "cam-2")])
    for i in range(50):
        ts = start + i * PERIOD
        spike = i >= 46                                    # cam-1: the last 4 intervals are slow
        batch.telemetry.append(("cam-1", i, ts, telemetry_doc(30.0 if spike else 5.0 + rng.gauss(0, 0.3),
                                                              55.0 + rng.gauss(0, 0.3))))
        batch.telemetry.append(("cam-2", i, ts, telemetry_doc(5.0 + rng.gauss(0, 0.4), 60.0 + rng.gauss(0, 0.3))))
    store.write_batch(batch)

    engine = AlertEngine(store, max_temperatures={"rpi4-cpu": 85.0})
    opened = engine.run_once(now)
    assert [(a["device_id"], a["kind"]) for a in opened] == [("cam-1", "anomaly_latency")]
    (alert,) = store.alerts()
    assert alert["message"].startswith("cam-1: p95 latency 30.00 ms is far above its normal 5.")
    assert f"since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(start + 46 * PERIOD))}" in alert["message"]
    details = alert["details"]
    assert details["value"] == 30.0 and details["since"] == start + 46 * PERIOD and details["points"] == 4
    assert details["z"] > CFG.threshold and details["median"] == pytest.approx(5.0, abs=0.3)

    # cam-1 is fast again: the next evaluation closes the alert.
    store.write_batch(IngestBatch(telemetry=[("cam-1", 50, now + 1, telemetry_doc(5.0, 55.0))]))
    assert engine.run_once(now + 2) == []
    assert store.alerts() == [] and store.alerts(active_only=False)[0]["closed_at"] == now + 2
