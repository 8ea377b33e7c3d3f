"""The fleet store (fleet/store.py): every test runs against SQLite AND a real PostgreSQL 15.

PostgreSQL: the server on 127.0.0.1:5432; the session gets its own database (tests/support/
postgres.py), each test an empty schema.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from fleet.db import StoreError, StoreUnavailableError, parse_url
from fleet.store import MIGRATIONS_DIR, IngestBatch, open_store
from tests.support.broker import free_port
from tests.support.postgres import postgres_db  # noqa: F401  (session fixture)

LATEST = max(int(p.name[:4]) for p in MIGRATIONS_DIR.glob("*.sql"))   # other helpers add migrations too
T0 = 1_700_000_000.0   # a whole hour: 1_700_000_000 % 3600 == 800 -> use T0 - 800 for hour-aligned times
HOUR0 = T0 - (T0 % 3600)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    pg = request.getfixturevalue("postgres_db")
    pg.reset()
    return pg.url


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    s.migrate()
    yield s
    s.close()


# --------------------------------------------------------------------------- message builders

def doc(*, p95=5.0, ips=10.0, count=100, errors=0, cpu=20.0, temp=50.0, model=("digits", 3), p50=None, p99=None,
        delegate="xnnpack", mem=(1000, 250)) -> dict:
    """A telemetry DOC shaped like agent/telemetry.py collect()."""
    return {
        "schema": 1, "type": "telemetry", "time": T0, "agent": {"version": "0.1.0", "uptime_s": 10.0},
        "model": {"name": model[0], "version": model[1], "sha256": "ab" * 32} if model else None,
        "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": delegate},
        "inference": {"count": count, "errors": errors, "interval_s": 10.0, "inferences_per_s": ips, "sampled": count,
                      "latency_ms": {"p50": p50 if p50 is not None else p95 / 2, "p95": p95,
                                     "p99": p99 if p99 is not None else p95 * 1.5, "mean": p95 / 2, "max": p95 * 2}},
        "system": {"cpu_percent": cpu, "temperature_c": temp, "memory_total_bytes": mem[0],
                   "memory_available_bytes": mem[1], "memory_used_bytes": mem[0] - mem[1]},
        "spool": {"pending": 0, "dropped": 0},
    }


def birth(device_id, ts, *, groups=("lab",), profile="rpi4", model=("digits", 3), labels=None) -> dict:
    return {"v": 1, "state": "online", "device_id": device_id, "ts": ts, "fleet": "f1", "groups": list(groups),
            "labels": labels or {"site": "a"}, "profile": profile, "agent_version": "0.1.0",
            "runtime": {"name": "ai-edge-litert", "version": "2.3.0"}, "delegates_available": ["xnnpack"],
            "engine": {"runtime": "ai-edge-litert", "delegate": "xnnpack"},
            "active_model": {"name": model[0], "version": model[1], "sha256": "cd" * 32} if model else None,
            "hardware": {"machine": "aarch64"}}


def will(device_id, ts, reason="connection lost") -> dict:
    return {"v": 1, "state": "offline", "device_id": device_id, "ts": ts, "reason": reason}


def event(device_id, seq, ts, kind, *, command_id="", reason="", **details) -> tuple:
    return (device_id, seq, ts, {"v": 1, "device_id": device_id, "seq": seq, "ts": ts, "kind": kind,
                                 "reason": reason or kind, "command_id": command_id, "details": details})


def tel(device_id, seq, ts, **kw) -> tuple:
    return (device_id, seq, ts, doc(**kw))


# --------------------------------------------------------------------------- schema

def test_url_forms(tmp_path):
    assert parse_url(f"sqlite:///{tmp_path}/a.db") == ("sqlite", f"{tmp_path}/a.db")
    assert parse_url(f"sqlite:////{str(tmp_path).lstrip('/')}/a.db") == ("sqlite", f"{tmp_path}/a.db")
    assert parse_url("fleet.db") == ("sqlite", "fleet.db")
    assert parse_url("postgresql://u@h/db")[0] == "postgresql"
    with pytest.raises(StoreError, match="unsupported database scheme 'mysql'"):
        parse_url("mysql://x/y")
    s = open_store(f"sqlite:///{tmp_path}/sub/dir/fleet.db")   # parent directories are created
    assert s.backend == "sqlite" and s.migrate() == LATEST
    s.close()
    assert (tmp_path / "sub" / "dir" / "fleet.db").exists()


def test_unreachable_postgres_is_reported_as_unavailable():
    port = free_port()
    with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
        open_store(f"postgresql://postgres@127.0.0.1:{port}/nothing")


def test_migrate_is_idempotent_and_versioned(store_url, tmp_path):
    s = open_store(store_url)
    assert s.schema_version() == 0
    assert s.migrate() == LATEST
    assert s.migrate() == LATEST                  # nothing pending: no error, same version
    with s.db.transaction() as tx:
        applied = tx.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert applied == [(v, name) for v, name, _ in s.migrations()] and applied[0] == (1, "initial")
    s.close()

    newer = tmp_path / "migrations"
    newer.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, newer)
    nxt = LATEST + 1
    (newer / f"{nxt:04d}_notes.sql").write_text(
        "-- a later version\nCREATE TABLE notes (\n  id TEXT PRIMARY KEY,\n"
        "  body TEXT NOT NULL DEFAULT ''\n);\nCREATE INDEX notes_body ON notes (body);\n")
    s2 = open_store(store_url, migrations_dir=newer)
    assert s2.migrate() == nxt
    with s2.db.transaction(write=True) as tx:
        tx.execute("INSERT INTO notes (id) VALUES (?)", ("n1",))
    assert s2.migrate() == nxt
    s2.close()

    old = open_store(store_url)                  # code that knows one version less
    with pytest.raises(StoreError, match=f"schema version {nxt}, newer than this litefleet knows"):
        old.migrate()
    old.close()


def test_broken_migration_is_rolled_back(store_url, tmp_path):
    bad = tmp_path / "migrations"
    bad.mkdir()
    (bad / "0001_bad.sql").write_text("CREATE TABLE ok_table (id TEXT);\nCREATE TABLE broken (;\n")
    s = open_store(store_url, migrations_dir=bad)
    with pytest.raises(StoreError, match="0001_bad.sql: migration 1 failed"):
        s.migrate()
    assert s.schema_version() == 0
    with s.db.transaction() as tx:   # the first statement was rolled back with the failed one
        with pytest.raises(Exception):
            tx.query("SELECT * FROM ok_table")
    s.close()


# --------------------------------------------------------------------------- ingest

def test_write_batch_inserts_and_dedupes(store):
    batch = IngestBatch(
        statuses=[("d1", birth("d1", T0))],
        telemetry=[tel("d1", 0, T0 + 1), tel("d1", 1, T0 + 2), tel("d1", 1, T0 + 2)],   # a repeat inside the batch
        events=[event("d1", 2, T0 + 3, "agent_started")])
    r = store.write_batch(batch)
    assert (r.inserted_telemetry, r.inserted_events, r.duplicates, r.statuses) == (2, 1, 1, 1)
    again = store.write_batch(batch)            # QoS 1 redelivery of everything
    assert (again.inserted_telemetry, again.inserted_events, again.duplicates) == (0, 0, 4)
    assert store.table_sizes()["telemetry_raw"] == 2
    assert len(store.events(device_id="d1")) == 1
    assert store.losses()["d1"] == {"received": 3, "min_seq": 0, "max_seq": 2, "lost": 0}
    assert store.write_batch(IngestBatch()).inserted_telemetry == 0


def test_losses_from_gaps_duplicates_and_out_of_order(store):
    # seq 0..9 shared by telemetry and events; 3, 4 and 8 missing at first; 6 arrives before 5.
    store.write_batch(IngestBatch(telemetry=[tel("d1", s, T0 + s) for s in (0, 1, 2, 6)],
                                  events=[event("d1", 7, T0 + 7, "agent_started")]))
    assert store.losses()["d1"]["lost"] == 3                    # 3, 4, 5 missing between 0 and 7
    store.write_batch(IngestBatch(telemetry=[tel("d1", s, T0 + s) for s in (5, 6, 9, 2)]))   # 6 and 2 again
    assert store.losses()["d1"] == {"received": 7, "min_seq": 0, "max_seq": 9, "lost": 3}    # 3, 4, 8
    store.write_batch(IngestBatch(telemetry=[tel("d1", 3, T0 + 3)], events=[event("d1", 8, T0 + 8, "installed")]))
    assert store.losses()["d1"]["lost"] == 1                    # only 4 still missing
    store.write_batch(IngestBatch(telemetry=[tel("d2", 10, T0)]))   # a device first heard of mid-stream
    assert store.losses()["d2"] == {"received": 1, "min_seq": 10, "max_seq": 10, "lost": 0}
    devices = {d["device_id"]: d for d in store.devices()}
    assert devices["d1"]["lost"] == 1 and devices["d1"]["received"] == 9
    assert store.counts()["lost"] == 1 and store.counts()["received"] == 10


def test_unstorable_values_do_not_fail_the_batch(store):
    weird = doc()
    weird["inference"]["count"] = 2**70                   # over BIGINT
    weird["inference"]["latency_ms"]["p95"] = "fast"      # not a number
    weird["system"]["cpu_percent"] = True                 # a bool is not a percentage
    weird["system"]["temperature_c"] = float("nan")
    weird["model"] = {"name": "di\x00gits", "version": 3}   # PostgreSQL refuses NUL in TEXT
    r = store.write_batch(IngestBatch(
        telemetry=[("d1", 0, T0, weird), ("d1", -1, T0, doc()), ("d1", 2**64, T0, doc()), ("", 3, T0, doc()),
                   ("d1", 1, T0 + 1, {"inference": [1, 2], "system": "hot"})],
        events=[("d1", 2, T0, {"kind": "x\x00y", "reason": None, "details": "not a dict"})],
        statuses=[("d1", {"state": "online", "ts": "yesterday", "groups": ["g", 5], "labels": [],
                          "active_model": "digits"})]))
    assert (r.inserted_telemetry, r.inserted_events, r.rejected) == (2, 1, 3)
    rows = store.telemetry("d1", since=0, resolution="raw")
    assert rows[0]["count"] is None and rows[0]["p95_ms"] is None and rows[0]["cpu_percent"] is None
    assert rows[0]["temperature_c"] is None and rows[0]["model_version"] == "digits v3"
    assert rows[1]["p95_ms"] is None and rows[1]["model_version"] is None
    assert store.events(device_id="d1")[0]["kind"] == "xy"
    d = store.device("d1")
    assert d["online"] and d["groups"] == ["g"] and d["labels"] == {}


def test_concurrent_writers_lose_nothing(store):
    """Two ingest threads (as with shared subscriptions) writing interleaved seqs of the same devices."""
    errors = []

    def writer(parity: int) -> None:
        try:
            for start in range(0, 400, 50):
                store.write_batch(IngestBatch(telemetry=[tel(f"d{s % 5}", s, T0 + s)
                                                         for s in range(start, start + 50) if s % 2 == parity]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    losses = store.losses()
    assert sum(v["received"] for v in losses.values()) == 400
    assert store.table_sizes()["telemetry_raw"] == 400


# --------------------------------------------------------------------------- devices

def test_devices_fields_online_offline_and_filters(store):
    store.write_batch(IngestBatch(statuses=[("d1", birth("d1", T0)),
                                            ("d2", birth("d2", T0, groups=("field", "lab"), profile="jetson",
                                                         model=None))]))
    store.write_batch(IngestBatch(telemetry=[tel("d1", 0, T0 + 10, p95=7.5, ips=20.0, cpu=33.0, temp=61.5),
                                             tel("d1", 1, T0 + 20, p95=8.5, ips=21.0, cpu=34.0, temp=62.5)]))
    d1 = store.device("d1")
    assert d1["online"] is True and d1["state"] == "online"
    assert (d1["fleet"], d1["profile"], d1["groups"], d1["labels"]) == ("f1", "rpi4", ["lab"], {"site": "a"})
    assert d1["model"]["name"] == "digits" and d1["model"]["version"] == 3 and d1["model_version"] == "digits v3"
    assert (d1["runtime"], d1["delegate"], d1["agent_version"]) == ("ai-edge-litert", "xnnpack", "0.1.0")
    assert (d1["p95_ms"], d1["inferences_per_s"], d1["cpu_percent"], d1["temperature_c"]) == (8.5, 21.0, 34.0, 62.5)
    assert d1["memory_percent"] == 75.0 and d1["last_seen"] == T0 + 20 and d1["status_ts"] == T0
    assert d1["hardware"] == {"machine": "aarch64"} and d1["pending_deployment"] is None and d1["lost"] == 0
    assert store.device("nope") is None

    # An older telemetry message redelivered late does not replace the latest figures.
    store.write_batch(IngestBatch(telemetry=[tel("d1", 2, T0 + 15, p95=99.0)]))
    assert store.device("d1")["p95_ms"] == 8.5

    # The last will carries the connect time (older than the birth): arrival order decides.
    store.write_batch(IngestBatch(statuses=[("d1", will("d1", T0 - 100))]))
    d1 = store.device("d1")
    assert d1["online"] is False and d1["offline_reason"] == "connection lost"
    assert d1["last_seen"] == T0 + 20 and d1["model_version"] == "digits v3"
    assert store.counts()["by_state"] == {"online": 1, "offline": 1}
    store.write_batch(IngestBatch(statuses=[("d1", birth("d1", T0 + 50, model=("digits", 4)))]))
    d1 = store.device("d1")
    assert d1["online"] is True and d1["offline_reason"] is None and d1["model_version"] == "digits v4"
    # A will and a birth in one batch: the later one in the batch wins.
    store.write_batch(IngestBatch(statuses=[("d2", will("d2", T0)), ("d2", birth("d2", T0 + 60, groups=("field", "lab"), profile="jetson"))]))
    assert store.device("d2")["online"] is True

    assert [d["device_id"] for d in store.devices()] == ["d1", "d2"]
    assert [d["device_id"] for d in store.devices(group="field")] == ["d2"]
    assert [d["device_id"] for d in store.devices(group="lab")] == ["d1", "d2"]
    assert [d["device_id"] for d in store.devices(profile="jetson")] == ["d2"]
    assert store.devices(profile="jetson", group="nothing") == []


def test_telemetry_model_newer_than_birth_wins(store):
    store.write_batch(IngestBatch(statuses=[("d1", birth("d1", T0, model=("digits", 3)))]))
    store.write_batch(IngestBatch(telemetry=[tel("d1", 0, T0 + 5, model=("digits", 4), delegate="gpu")]))
    assert store.device("d1")["model_version"] == "digits v4" and store.device("d1")["delegate"] == "gpu"
    store.write_batch(IngestBatch(statuses=[("d1", birth("d1", T0, model=("digits", 3)))]))   # retained, redelivered
    assert store.device("d1")["model_version"] == "digits v4"


def test_pending_deployment_follows_deploy_events(store):
    store.write_batch(IngestBatch(statuses=[("d1", birth("d1", T0)), ("d2", birth("d2", T0))]))
    store.write_batch(IngestBatch(events=[event("d1", 0, T0 + 1, "deploy_accepted", command_id="c1", blob="b")]))
    p = store.device("d1")["pending_deployment"]
    assert p["kind"] == "deploy_accepted" and p["command_id"] == "c1" and p["since"] == T0 + 1
    store.write_batch(IngestBatch(events=[event("d1", 1, T0 + 2, "deploy_progress", command_id="c1", percent=50,
                                                name="digits", version=4),
                                          event("d1", 2, T0 + 3, "delegate_fallback")]))   # not a deploy event
    p = store.devices()[0]["pending_deployment"]
    assert (p["kind"], p["percent"], p["version"]) == ("deploy_progress", 50, 4)
    store.write_batch(IngestBatch(events=[event("d1", 3, T0 + 4, "installed", command_id="c1")]))
    assert store.device("d1")["pending_deployment"] is None
    # Ended by a rejection; an out-of-order accepted (older seq) arriving late does not reopen it.
    store.write_batch(IngestBatch(events=[event("d2", 5, T0 + 5, "deploy_rejected", command_id="c2")]))
    store.write_batch(IngestBatch(events=[event("d2", 4, T0 + 4, "deploy_accepted", command_id="c2")]))
    assert store.device("d2")["pending_deployment"] is None
    store.write_batch(IngestBatch(events=[event("d2", 6, T0 + 6, "deploy_accepted", command_id="c3")]))
    assert store.device("d2")["pending_deployment"]["command_id"] == "c3"
    for end, seq in (("rolled_back", 7), ):
        store.write_batch(IngestBatch(events=[event("d2", seq, T0 + seq, end)]))
    assert all(d["pending_deployment"] is None for d in store.devices())


# --------------------------------------------------------------------------- telemetry, rollups, series

def _write_minutes(store, device_id, start, minutes, *, every_s=10, seq0=0, **kw):
    rows = []
    seq = seq0
    for m in range(minutes):
        for k in range(60 // every_s):
            rows.append(tel(device_id, seq, start + m * 60 + k * every_s, **kw))
            seq += 1
    store.write_batch(IngestBatch(telemetry=rows))
    return seq


def test_telemetry_raw_minute_and_hour_views(store):
    # Device d1, minute 0: p95 alternating 4 and 8, count 10 each, 6 rows a minute; minute 1: p95 10.
    rows = [tel("d1", k, HOUR0 + k * 10, p95=4.0 if k % 2 else 8.0, count=10, errors=1, temp=40.0 + k)
            for k in range(6)]
    rows += [tel("d1", 6 + k, HOUR0 + 60 + k * 10, p95=10.0, count=10, errors=0, temp=50.0) for k in range(6)]
    rows += [tel("d2", k, HOUR0 + 5, p95=100.0, model=("other", 1)) for k in range(1)]
    store.write_batch(IngestBatch(telemetry=rows))
    raw = store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="raw")
    assert len(raw) == 12 and raw[0]["resolution"] == "raw" and raw[0]["ts"] == HOUR0 and raw[0]["seq"] == 0
    assert raw[0]["p95_ms"] == 8.0 and raw[0]["count"] == 10 and raw[0]["errors"] == 1
    assert raw[0]["model_version"] == "digits v3"

    minutes = store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="minute")
    assert [m["ts"] for m in minutes] == [HOUR0, HOUR0 + 60]
    m0 = minutes[0]
    assert (m0["samples"], m0["count"], m0["errors"], m0["p95_ms"], m0["p95_max_ms"]) == (6, 60, 6, 6.0, 8.0)
    assert m0["temperature_c"] == pytest.approx(42.5) and m0["temperature_max_c"] == 45.0
    assert m0["resolution"] == "minute"

    # Roll everything up: the same minute buckets come back from the rollup table.
    store.rollup(HOUR0 + 7200, raw_retention_s=0, minute_retention_s=86400)
    assert store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="raw") == []
    assert store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="minute") == minutes
    hour = store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="hour")
    assert len(hour) == 1 and hour[0]["samples"] == 12 and hour[0]["count"] == 120
    assert hour[0]["p95_ms"] == pytest.approx(8.0) and hour[0]["p95_max_ms"] == 10.0
    # auto over a short range returns the minute rollups that replaced the raw rows.
    auto = store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600)
    assert [a["resolution"] for a in auto] == ["minute", "minute"]
    both = store.telemetry(None, since=HOUR0, until=HOUR0 + 3600, resolution="minute")
    assert {(r["device_id"], r["model_version"]) for r in both} == {("d1", "digits v3"), ("d2", "other v1")}
    with pytest.raises(StoreError, match="resolution 'daily'"):
        store.telemetry("d1", since=0, resolution="daily")


def test_keep_documents_stores_the_whole_document(store_url):
    s = open_store(store_url, keep_documents=True)
    s.migrate()
    s.write_batch(IngestBatch(telemetry=[tel("d1", 0, T0)]))
    assert s.telemetry("d1", since=0, resolution="raw")[0]["data"]["spool"] == {"pending": 0, "dropped": 0}
    s.close()


def test_rollup_bounds_growth_keeps_totals_and_is_idempotent(store):
    """Six simulated hours of 3 devices reporting every 10 s, rolled up every 10 minutes."""
    seqs = {d: 0 for d in ("d1", "d2", "d3")}
    sizes = []
    total_count = 0
    for step in range(36):                                    # 36 x 10 minutes
        start = HOUR0 + step * 600
        for d in seqs:
            seqs[d] = _write_minutes(store, d, start, 10, seq0=seqs[d], count=7)
            total_count += 7 * 60
        now = start + 600
        first = store.rollup(now, raw_retention_s=900, minute_retention_s=2 * 3600)
        second = store.rollup(now, raw_retention_s=900, minute_retention_s=2 * 3600)
        assert second["raw_deleted"] == 0 and second["minute_deleted"] == 0 and second["minute_rows_written"] == 0
        sizes.append(store.table_sizes())
        assert first["raw_cutoff"] <= now - 900
    last = sizes[-1]
    # Bounded: raw <= (15 min + 10 min written) x 6/min x 3, minute <= (2 h + 1 h alignment) x 60 x 3.
    assert last["telemetry_raw"] <= 26 * 6 * 3
    assert last["telemetry_minute"] <= 3 * 60 * 3
    assert last["telemetry_hour"] <= 6 * 3
    assert max(s["telemetry_raw"] for s in sizes[10:]) == min(s["telemetry_raw"] for s in sizes[10:])   # steady
    # Nothing lost or double counted: the total of 'count' over all resolutions is what was written.
    rows = store.telemetry(None, since=HOUR0 - 3600, until=HOUR0 + 10 * 3600, resolution="hour")
    assert sum(r["count"] for r in rows) == total_count
    assert sum(r["samples"] for r in rows) == 36 * 10 * 6 * 3
    # A late row for a bucket already rolled into hours is merged into it, not lost.
    store.write_batch(IngestBatch(telemetry=[tel("d1", 10**6, HOUR0 + 30, count=1000)]))
    store.rollup(HOUR0 + 36 * 600, raw_retention_s=900, minute_retention_s=2 * 3600)
    first_hour = store.telemetry("d1", since=HOUR0, until=HOUR0 + 3600, resolution="hour")
    assert first_hour[0]["resolution"] == "hour" and first_hour[0]["count"] == 360 * 7 + 1000
    store.rollup(HOUR0 + 100 * 3600, raw_retention_s=0, minute_retention_s=0, hour_retention_s=3600)
    assert store.table_sizes()["telemetry_hour"] == 0


def test_series_by_model_version(store):
    # Two devices on v3 (p95 4 and 6, 10 inf/s each), one on v4 (p95 2, 30 inf/s), two minutes.
    rows = []
    for m in range(2):
        for k in range(6):
            ts = HOUR0 + m * 60 + k * 10
            rows.append(tel("a", m * 6 + k, ts, p95=4.0, ips=10.0))
            rows.append(tel("b", m * 6 + k, ts, p95=6.0, ips=10.0))
            rows.append(tel("c", m * 6 + k, ts, p95=2.0, ips=30.0, model=("digits", 4)))
    store.write_batch(IngestBatch(telemetry=rows))
    p95 = store.series(since=HOUR0, until=HOUR0 + 3600, metric="p95_ms")
    assert set(p95) == {"digits v3", "digits v4"}
    assert p95["digits v3"] == [(HOUR0, 5.0), (HOUR0 + 60, 5.0)]   # 60 s buckets over 1 h
    assert p95["digits v4"] == [(HOUR0, 2.0), (HOUR0 + 60, 2.0)]
    ips = store.series(since=HOUR0, until=HOUR0 + 120, metric="inferences_per_s")   # 10 s buckets over 2 min
    assert len(ips["digits v3"]) == 12 and all(v == 20.0 for _, v in ips["digits v3"])
    assert all(v == 30.0 for _, v in ips["digits v4"])
    # Rolled up, the throughput is the same (it does not depend on the table the data sits in).
    store.rollup(HOUR0 + 7200, raw_retention_s=0, minute_retention_s=86400)
    after = store.series(since=HOUR0, until=HOUR0 + 3600, metric="inferences_per_s")
    assert after["digits v3"] == [(HOUR0, 20.0), (HOUR0 + 60, 20.0)]
    assert store.series(since=HOUR0, until=HOUR0 + 3600, metric="inferences_per_s", by="all")["all"][0][1] == 50.0
    with pytest.raises(StoreError, match="metric 'cpu'"):
        store.series(since=HOUR0, metric="cpu")


# --------------------------------------------------------------------------- events, alerts, counts

def test_events_filters(store):
    store.write_batch(IngestBatch(events=[
        event("d1", 0, T0, "deploy_accepted", command_id="c1"),
        event("d1", 1, T0 + 1, "deploy_progress", command_id="c1", percent=25),
        event("d1", 2, T0 + 2, "installed", command_id="c1"),
        event("d2", 0, T0 + 3, "agent_started"),
        event("d2", 1, T0 + 4, "install_failed", command_id="c1", code="hash")]))
    assert [e["seq"] for e in store.events(device_id="d1")] == [2, 1, 0]            # newest first
    assert [e["device_id"] for e in store.events(command_id="c1", kinds=["installed", "install_failed"])] == \
        ["d2", "d1"]
    assert len(store.events(since=T0 + 2)) == 3 and len(store.events(limit=2)) == 2
    e = store.events(device_id="d2", kinds=["install_failed"])[0]
    assert e["details"] == {"code": "hash"} and e["reason"] == "install_failed" and e["ts"] == T0 + 4
    assert store.events(device_id="d2", kinds=["agent_started"])[0]["command_id"] is None
    assert store.events(device_id="nobody") == []


def test_alerts_open_refresh_close(store):
    a = {"device_id": "d1", "kind": "offline", "open": True, "message": "offline for 5 min", "details": {"s": 300},
         "ts": T0}
    assert store.record_alert(a) is True
    assert store.record_alert({**a, "message": "offline for 6 min", "ts": T0 + 60}) is False   # refreshed
    assert store.record_alert({"device_id": "d2", "kind": "temperature", "open": True, "message": "hot"}) is True
    active = store.alerts()
    assert {(x["device_id"], x["kind"]) for x in active} == {("d1", "offline"), ("d2", "temperature")}
    d1 = next(x for x in active if x["device_id"] == "d1")
    assert d1["message"] == "offline for 6 min" and d1["opened_at"] == T0 and d1["active"] is True
    assert store.counts()["alerts_open"] == {"offline": 1, "temperature": 1}
    assert store.record_alert({**a, "open": False, "ts": T0 + 120}) is True
    assert store.record_alert({**a, "open": False}) is False                      # nothing open to close
    assert [x["kind"] for x in store.alerts()] == ["temperature"]
    assert store.record_alert({**a, "ts": T0 + 200}) is True                      # a new episode
    history = [x for x in store.alerts(active_only=False) if x["kind"] == "offline"]
    assert len(history) == 2 and sum(x["active"] for x in history) == 1
    closed = next(x for x in history if not x["active"])
    assert closed["closed_at"] == T0 + 120
    with pytest.raises(StoreError, match="'kind' is required"):
        store.record_alert({"device_id": "d1", "open": True})


def test_counts_by_state_model_and_profile(store):
    store.write_batch(IngestBatch(statuses=[
        ("a", birth("a", T0, profile="rpi4", model=("digits", 3))),
        ("b", birth("b", T0, profile="rpi4", model=("digits", 4))),
        ("c", birth("c", T0, profile="jetson", model=("digits", 4))),
        ("d", birth("d", T0, profile="jetson", model=None))]))
    store.write_batch(IngestBatch(statuses=[("c", will("c", T0))]))
    c = store.counts()
    assert (c["online"], c["offline"], c["total"]) == (3, 1, 4)
    assert c["by_model_version"] == {"digits v3": 1, "digits v4": 2, "none": 1}
    assert c["by_profile"] == {"rpi4": 2, "jetson": 2}
    assert c["by_profile_state"]["jetson"] == {"online": 1, "offline": 1}
    assert c["by_model_version_state"]["digits v4"] == {"online": 1, "offline": 1}


# --------------------------------------------------------------------------- failures

def test_unmigrated_database_is_an_error_not_an_outage(store_url):
    """A missing table is not something a retry fixes: StoreError, not StoreUnavailableError."""
    s = open_store(store_url)
    with pytest.raises(StoreError) as info:
        s.devices()
    assert not isinstance(info.value, StoreUnavailableError) and "devices" in str(info.value)
    s.close()


def test_postgres_connections_killed_then_store_recovers(postgres_db):
    """The database drops our connections (as in a restart): one StoreUnavailableError, then it reconnects."""
    import psycopg
    postgres_db.reset()
    s = open_store(postgres_db.url)
    s.migrate()
    s.write_batch(IngestBatch(telemetry=[tel("d1", 0, T0)]))
    with psycopg.connect(postgres_db.admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                      "AND pid <> pg_backend_pid()", (postgres_db.name,))
    with pytest.raises(StoreUnavailableError, match="postgresql database"):
        s.write_batch(IngestBatch(telemetry=[tel("d1", 1, T0 + 1)]))
    r = s.write_batch(IngestBatch(telemetry=[tel("d1", 1, T0 + 1)]))   # the retry of the same batch
    assert r.inserted_telemetry == 1
    assert s.losses()["d1"] == {"received": 2, "min_seq": 0, "max_seq": 1, "lost": 0}
    s.close()
