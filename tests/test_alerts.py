"""Alert rules: pure decisions over made-up device rows and telemetry, then the engine on a real SQLite store."""

from __future__ import annotations

import logging
import time

import pytest

from fleet import alerts
from fleet.alerts import AlertConfig, AlertEngine, evaluate, latency_rule, offline_rule, temperature_rule
from tests.test_server_api import any_store, pg_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

NOW = 1_800_000_000.0
CFG = AlertConfig()


def device(device_id: str = "dev-1", **fields):
    row = {"device_id": device_id, "online": True, "last_seen": NOW - 5, "status_ts": NOW - 600,
           "profile": "rpi4-cpu", "temperature_c": 50.0}
    row.update(fields)
    return row


def rows(start: float, step: float, p95s: list[float]) -> list[dict]:
    return [{"ts": start + i * step, "p95_ms": p, "count": 100} for i, p in enumerate(p95s)]


# offline ---------------------------------------------------------------------------------

def test_offline_opens_only_after_the_threshold_and_closes_when_back():
    gone = device(online=False, last_seen=NOW - 299)
    assert offline_rule(gone, NOW, False, CFG) is None
    gone = device(online=False, last_seen=NOW - 301)
    d = offline_rule(gone, NOW, False, CFG)
    assert d is not None and d.active and d.kind == "offline"
    assert "last seen 5 min 1 s ago" in d.message and "threshold" in d.message
    assert offline_rule(gone, NOW, True, CFG) is None           # already open: nothing new
    back = offline_rule(device(online=True), NOW, True, CFG)
    assert back is not None and not back.active
    assert offline_rule(device(online=True), NOW, False, CFG) is None


def test_offline_threshold_is_configurable():
    gone = device(online=False, last_seen=NOW - 61)
    assert offline_rule(gone, NOW, False, AlertConfig(offline_after_s=60)) is not None
    assert offline_rule(gone, NOW, False, CFG) is None


# temperature -----------------------------------------------------------------------------

def test_temperature_over_the_profile_limit_opens_and_closes_with_hysteresis():
    hot = device(temperature_c=86.0)
    d = temperature_rule(hot, 85.0, NOW, False, CFG)
    assert d is not None and d.active and "86.0 °C" in d.message and "85" in d.message
    assert temperature_rule(device(temperature_c=85.0), 85.0, NOW, False, CFG) is None
    assert temperature_rule(device(temperature_c=84.5), 85.0, NOW, True, CFG) is None   # inside the hysteresis
    closed = temperature_rule(device(temperature_c=83.9), 85.0, NOW, True, CFG)
    assert closed is not None and not closed.active
    assert temperature_rule(device(temperature_c=None), 85.0, NOW, True, CFG) is None


def test_evaluate_uses_each_devices_profile_limit():
    # rpi4-cpu allows 80 °C, jetson-gpu 90 °C (the bundled profiles): 87 °C is hot on one only.
    limits = alerts.profile_temperature_limits()
    assert limits["rpi4-cpu"] == 80.0 and limits["jetson-gpu"] == 90.0
    devices = [device("pi", profile="rpi4-cpu", temperature_c=87.0),
               device("jetson", profile="jetson-gpu", temperature_c=87.0),
               device("mystery", profile="no-such-profile", temperature_c=86.0)]
    decisions = evaluate(devices, now=NOW, active=set(), max_temperatures=limits, installs={}, telemetry={})
    assert sorted((d.device_id, d.kind) for d in decisions) == [("mystery", "temperature"), ("pi", "temperature")]


# latency regression ----------------------------------------------------------------------

def test_latency_regression_after_an_install():
    t0 = NOW - 600
    installed = {"ts": t0, "kind": "installed", "details": {"version": 3}, "command_id": "c-1"}
    before = rows(t0 - 300, 30, [5.0, 5.2, 4.9, 5.1, 5.0, 30.0])   # one outlier does not move the median
    after = rows(t0 + 10, 30, [9.0, 8.8, 9.2, 9.1, 8.9])
    d = latency_rule("dev-1", installed, before + after, NOW, False, CFG)
    assert d is not None and d.active and d.kind == "latency_regression"
    assert d.details["p95_before_ms"] == 5.05 and d.details["p95_after_ms"] == 9.0
    assert "v3" in d.message and "1.78x" in d.message
    assert latency_rule("dev-1", installed, before + after, NOW, True, CFG) is None


def test_no_regression_within_the_ratio_and_closing_when_recovered():
    t0 = NOW - 600
    installed = {"ts": t0, "details": {}}
    before = rows(t0 - 300, 30, [5.0] * 6)
    slightly = rows(t0 + 10, 30, [7.4] * 6)                       # 1.48x: under 1.5x
    assert latency_rule("dev-1", installed, before + slightly, NOW, False, CFG) is None
    closed = latency_rule("dev-1", installed, before + slightly, NOW, True, CFG)
    assert closed is not None and not closed.active


def test_latency_needs_enough_samples_on_both_sides():
    t0 = NOW - 600
    installed = {"ts": t0, "details": {}}
    before = rows(t0 - 300, 30, [5.0] * 6)
    after = rows(t0 + 10, 30, [50.0] * 4)                          # 4 < latency_min_samples
    assert latency_rule("dev-1", installed, before + after, NOW, False, CFG) is None
    idle = [{"ts": t0 + 10 + i, "p95_ms": None, "count": 0} for i in range(10)]   # no inferences: no latency
    assert latency_rule("dev-1", installed, before + idle, NOW, False, CFG) is None
    assert latency_rule("dev-1", None, before + after, NOW, False, CFG) is None


# The engine on a real SQLite store ----------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    from fleet.store import open_store
    s = open_store(str(tmp_path / "fleet.db"))
    s.migrate()
    yield s
    s.close()


def test_engine_opens_logs_and_closes_alerts_in_the_store(any_store, caplog):
    """On SQLite and PostgreSQL."""
    from fleet.store import IngestBatch
    store = any_store
    from tests.test_server_api import DIGITS_V2, DIGITS_V3, birth, event_msg, last_will, telemetry_doc
    now = time.time()
    installed_at = now - 600
    statuses = [(d, birth(d, now - 3000, profile="rpi4-cpu", groups=[], model=DIGITS_V2))
                for d in ("dev-off", "dev-hot", "dev-slow", "dev-ok")]
    telemetry, events = [], []
    for i in range(40):                                        # every 30 s for 20 minutes
        ts = now - 1200 + i * 30
        slow_after = ts > installed_at
        telemetry.append(("dev-slow", i + 1, ts, telemetry_doc(ts, model=DIGITS_V3 if slow_after else DIGITS_V2,
                                                               p95=10.0 if slow_after else 5.0, ips=20, cpu=40,
                                                               temp=60.0)))
        telemetry.append(("dev-hot", i + 1, ts, telemetry_doc(ts, model=DIGITS_V2, p95=5.0, ips=20, cpu=90,
                                                              temp=83.0)))            # rpi4-cpu's limit is 80 °C
        telemetry.append(("dev-ok", i + 1, ts, telemetry_doc(ts, model=DIGITS_V2, p95=5.0, ips=20, cpu=30, temp=50.0)))
    telemetry.append(("dev-off", 1, now - 2000, telemetry_doc(now - 2000, model=DIGITS_V2, p95=5, ips=1, cpu=1,
                                                              temp=40.0)))
    events.append(("dev-slow", 100, installed_at, event_msg("dev-slow", 100, installed_at, "installed",
                                                            "digits v3 active", "cmd-9",
                                                            {"name": "digits", "version": 3})))
    store.write_batch(IngestBatch(statuses=statuses, telemetry=telemetry, events=events))
    store.write_batch(IngestBatch(statuses=[("dev-off", last_will("dev-off", now - 900))]))

    published = []
    engine = AlertEngine(store, on_open=published.append)
    with caplog.at_level(logging.INFO, logger="litefleet.alerts"):
        opened = engine.run_once(now)
    assert sorted((a["device_id"], a["kind"]) for a in opened) == [
        ("dev-hot", "temperature"), ("dev-off", "offline"), ("dev-slow", "latency_regression")]
    assert published == opened
    active = {(a["device_id"], a["kind"]): a for a in store.alerts()}
    assert set(active) == {(a["device_id"], a["kind"]) for a in opened}
    regression = active[("dev-slow", "latency_regression")]
    assert regression["details"]["p95_before_ms"] == 5.0 and regression["details"]["p95_after_ms"] == 10.0
    assert "v3" in regression["message"] and "2.00x" in regression["message"]
    opened_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert opened")]
    assert len(opened_lines) == 3 and any("83.0 °C" in line and "80" in line for line in opened_lines)

    assert engine.run_once(now + 30) == []                    # still true: nothing new, nothing logged again

    # dev-off comes back, dev-hot cools down: both close; the regression stays.
    store.write_batch(IngestBatch(
        statuses=[("dev-off", birth("dev-off", now + 40, profile="rpi4-cpu", groups=[], model=DIGITS_V2))],
        telemetry=[("dev-hot", 41, now + 45, telemetry_doc(now + 45, model=DIGITS_V2, p95=5, ips=20, cpu=30,
                                                           temp=70.0))]))
    assert engine.run_once(now + 60) == []
    assert [(a["device_id"], a["kind"]) for a in store.alerts()] == [("dev-slow", "latency_regression")]
    closed = [a for a in store.alerts(active_only=False) if not a["active"]]
    assert sorted(a["kind"] for a in closed) == ["offline", "temperature"]


def test_engine_keeps_running_when_the_store_fails(store):
    class Flaky:
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(store, name)

        def devices(self, **kw):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("database is down")
            return store.devices(**kw)

    flaky = Flaky()
    engine = AlertEngine(flaky, max_temperatures={})
    engine.start(interval_s=0.05)
    try:
        from tests.support.agents import wait_for
        wait_for(lambda: engine.runs >= 2, 10, "two successful alert evaluations after a failure")
        assert engine.last_error is None and flaky.calls >= 3
    finally:
        engine.stop()
