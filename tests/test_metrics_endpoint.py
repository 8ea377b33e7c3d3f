"""/metrics: the Prometheus exposition over a real SQLite store, parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.api import ApiServer, ServerApi
from fleet.metrics import FleetCollector, exposition, make_registry
from tests.test_server_api import DIGITS_V2, TOKEN, any_store, birth, fill_store, pg_database, telemetry_doc  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    from fleet.store import open_store
    s = open_store(str(tmp_path / "fleet.db"))
    s.migrate()
    yield s
    s.close()


def samples(text: str) -> dict[str, list]:
    """metric sample name -> [(labels, value)]."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict[str, list], name: str, **labels) -> float:
    matches = [v for lab, v in found.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {found.get(name)}"
    return matches[0]


def test_scrape_over_http_reports_the_fleet(any_store, tmp_path):
    """On SQLite and PostgreSQL."""
    store = any_store
    now = time.time()
    fill_store(store, now)
    store.record_alert({"device_id": "dev-b", "kind": "temperature", "open": True, "ts": now, "message": "hot"})
    stats = {"messages": 1234, "messages_per_s": 56.5, "db_errors": 1, "batches": 7}
    api = ServerApi(store, TOKEN, ingest_stats=lambda: stats, web_dir=tmp_path)
    with ApiServer(api, port=0) as server:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:   # no token needed
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            found = samples(response.read().decode())

    assert value(found, "litefleet_devices", state="online") == 2
    assert value(found, "litefleet_devices", state="offline") == 1
    assert value(found, "litefleet_devices_by_model", model="digits", version="2") == 2
    assert value(found, "litefleet_devices_by_model", model="digits", version="3") == 1
    assert value(found, "litefleet_devices_by_profile", profile="jetson-gpu") == 1
    assert value(found, "litefleet_ingest_messages_total") == 1234
    assert value(found, "litefleet_ingest_rate") == 56.5
    assert value(found, "litefleet_ingest_db_errors_total") == 1
    # Only devices that lost something get a loss series.
    assert found["litefleet_messages_lost_total"] == [({"device": "dev-c"}, 2.0)]
    assert value(found, "litefleet_fleet_messages_lost_total") == 2
    assert value(found, "litefleet_device_p95_latency_ms", device="dev-b", model_version="digits v3") == 3.0
    assert value(found, "litefleet_device_inferences_per_second", device="dev-a") == 20.0
    assert value(found, "litefleet_device_cpu_percent", device="dev-b") == 60.0
    assert value(found, "litefleet_device_temperature_celsius", device="dev-b") == 95.5
    assert "dev-c" not in {lab["device"] for lab, _ in found["litefleet_device_temperature_celsius"]}  # no sensor
    assert value(found, "litefleet_device_online", device="dev-a") == 1
    assert value(found, "litefleet_device_online", device="dev-c") == 0
    assert value(found, "litefleet_alerts_active", kind="temperature") == 1
    assert value(found, "litefleet_alerts_active", kind="offline") == 0
    assert value(found, "litefleet_device_series_omitted") == 0


def test_labels_stay_bounded_on_a_big_fleet(store):
    """40 devices, each losing i messages: per-device series capped at 10, loss series at 3 plus _other."""
    from fleet.store import IngestBatch
    now = time.time()
    statuses, telemetry = [], []
    for i in range(40):
        device_id = f"dev-{i:03d}"
        statuses.append((device_id, birth(device_id, now - 100, profile="rpi4-cpu", groups=[], model=DIGITS_V2)))
        for seq in (1, 2 + i):                      # seqs 2 .. 1+i missing: i lost
            telemetry.append((device_id, seq, now - 50 + seq, telemetry_doc(now - 50 + seq, model=DIGITS_V2, p95=4.0,
                                                                           ips=10.0, cpu=10.0, temp=40.0)))
    store.write_batch(IngestBatch(statuses=statuses, telemetry=telemetry, events=[]))
    registry = make_registry(store, None, max_devices=10, max_loss_devices=3)
    body, _ = exposition(registry)
    found = samples(body.decode())

    assert value(found, "litefleet_devices", state="online") == 40        # the counts still cover everyone
    for name in ("litefleet_device_p95_latency_ms", "litefleet_device_online", "litefleet_device_cpu_percent"):
        devices = {lab["device"] for lab, _ in found[name]}
        assert devices == {f"dev-{i:03d}" for i in range(10)}, name     # the same 10 on every scrape
    assert value(found, "litefleet_device_series_omitted") == 30
    losses = dict((lab["device"], v) for lab, v in found["litefleet_messages_lost_total"])
    assert set(losses) == {"dev-039", "dev-038", "dev-037", "_other"}   # the worst three by name, the rest summed
    assert losses["dev-039"] == 39
    assert sum(losses.values()) == sum(range(40)) == value(found, "litefleet_fleet_messages_lost_total")
    label_sets = {tuple(sorted(lab.items())) for series in found.values() for lab, _ in series}
    assert len(label_sets) < 80


def test_a_failing_ingest_stats_source_does_not_break_the_scrape(store):
    fill_store(store, time.time())

    def broken():
        raise RuntimeError("ingest gone")

    found = samples(exposition(make_registry(store, broken))[0].decode())
    assert value(found, "litefleet_ingest_messages_total") == 0
    assert value(found, "litefleet_devices", state="online") == 2


def test_grafana_dashboard_reads_only_exported_series(store):
    fill_store(store, time.time())
    store.record_alert({"device_id": "dev-b", "kind": "temperature", "open": True, "message": "hot"})
    collector = FleetCollector(store, lambda: {"messages": 1, "messages_per_s": 1.0})
    exported = {s.name for family in collector.collect() for s in family.samples} | \
               {family.name for family in collector.collect()}
    dashboard = json.loads((ROOT / "docs" / "grafana" / "litefleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\blitefleet_[a-z0-9_]+", expr)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for words in ("online", "offline", "model version", "p95 latency by device", "inferences per second", "lost",
                  "alerts"):
        assert words in titles, words
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
