"""Benchmark: the fleet store's ingest write path, SQLite and PostgreSQL, against a raw INSERT.

* ours: ``Store.write_batch`` on batches of realistic telemetry documents (agent/telemetry.py
  ``collect()`` shape, 5,000 devices, one message per device in turn, seq increasing) with a
  few events; it extracts the figures, dedupes on (device_id, seq), updates the per-device
  sequence counters and the devices' latest figures, all in one transaction per batch.
* ours+documents: the same with ``keep_documents=True`` (each raw document also kept as JSON).
* raw: the same number of rows, already as tuples, inserted with ``executemany`` into a bare
  table of the same columns (no index, no dedupe, no JSON encoding), one transaction per batch.

Target: ours >= 10,000 rows/s on each backend (the ingest goal, leaving CPU for the broker and
the publisher). PostgreSQL: a throwaway database ``lf_bench_<pid>_<hex>`` is created on
``--pg`` (default: the local test server) and dropped at the end.

    .venv/bin/python -m bench.store_write [--quick] [--json] [--pg postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.store import IngestBatch, open_store  # noqa: E402

TARGET_ROWS_S = 10_000
DEVICES = 5_000


def telemetry_doc(i: int, seq: int, now: float) -> dict[str, Any]:
    """A document shaped like agent/telemetry.py collect() output."""
    return {
        "schema": 1, "type": "telemetry", "time": now,
        "agent": {"version": "0.1.0", "uptime_s": 1234.5},
        "model": {"name": "digits", "version": 3 + (i % 2), "sha256": "ab" * 32},
        "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": "xnnpack"},
        "inference": {"count": 100 + seq % 7, "errors": seq % 3, "interval_s": 10.0, "inferences_per_s": 9.7,
                      "sampled": 100, "latency_ms": {"p50": 4.1, "p95": 5.5 + (seq % 10) / 10, "p99": 7.2,
                                                     "mean": 4.3, "max": 9.9}},
        "system": {"cpu_percent": 23.5, "load_avg": [0.5, 0.4, 0.3], "memory_total_bytes": 4_000_000_000,
                   "memory_used_bytes": 1_000_000_000, "memory_available_bytes": 2_900_000_000,
                   "agent_rss_bytes": 80_000_000, "agent_cpu_percent": 3.2, "temperature_c": 51.0,
                   "temperatures_c": {"cpu_thermal": 51.0}, "disk_free_bytes": 10_000_000_000,
                   "disk_total_bytes": 30_000_000_000},
        "spool": {"pending": 0, "dropped": 0},
    }


def make_batches(n_rows: int, batch_size: int) -> list[IngestBatch]:
    now = time.time()
    batches, current = [], IngestBatch()
    next_seq = [0] * DEVICES   # one seq space per device, shared by its telemetry and events
    for k in range(n_rows):
        dev = k % DEVICES
        device_id = f"dev-{dev:05d}"
        if k % 1000 == 999:   # a few events
            current.events.append((device_id, next_seq[dev], now, {"kind": "deploy_progress", "reason": "25%",
                                                                   "command_id": "c1", "details": {"percent": 25}}))
            next_seq[dev] += 1
        seq = next_seq[dev]
        next_seq[dev] += 1
        current.telemetry.append((device_id, seq, now + k * 1e-4, telemetry_doc(dev, seq, now)))
        if len(current.telemetry) >= batch_size:
            batches.append(current)
            current = IngestBatch()
    if current.telemetry:
        batches.append(current)
    return batches


def bench_ours(url: str, batches: list[IngestBatch], keep_documents: bool = False) -> dict[str, float]:
    store = open_store(url, keep_documents=keep_documents)
    try:
        store.migrate()
        rows = sum(len(b.telemetry) + len(b.events) for b in batches)
        t0 = time.perf_counter()
        for b in batches:
            store.write_batch(b)
        elapsed = time.perf_counter() - t0
        redelivered = store.write_batch(batches[0])   # QoS 1 redelivery of a whole batch
        lost = sum(v["lost"] for v in store.losses().values())
        assert redelivered.duplicates == len(batches[0].telemetry) + len(batches[0].events), redelivered
        return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "lost": lost}
    finally:
        store.close()


RAW_COLS = "device_id, seq, ts, model_version, p50_ms, p95_ms, p99_ms, ips, cnt, errs, cpu, temp, mem"


def raw_rows(batches: list[IngestBatch]) -> list[list[tuple]]:
    return [[(d, s, ts, "digits v3", 4.1, 5.5, 7.2, 9.7, 100, 0, 23.5, 51.0, 27.5) for d, s, ts, _ in b.telemetry]
            for b in batches]


def bench_raw_sqlite(path: str, batches: list[list[tuple]]) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"CREATE TABLE raw ({RAW_COLS})")
    sql = f"INSERT INTO raw ({RAW_COLS}) VALUES ({','.join('?' * 13)})"
    t0 = time.perf_counter()
    for b in batches:
        conn.execute("BEGIN")
        conn.executemany(sql, b)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    rows = sum(map(len, batches))
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed}


def bench_raw_pg(url: str, batches: list[list[tuple]]) -> dict[str, float]:
    import psycopg
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE raw (device_id TEXT, seq BIGINT, ts DOUBLE PRECISION, model_version TEXT, "
                     "p50_ms DOUBLE PRECISION, p95_ms DOUBLE PRECISION, p99_ms DOUBLE PRECISION, ips DOUBLE PRECISION, "
                     "cnt BIGINT, errs BIGINT, cpu DOUBLE PRECISION, temp DOUBLE PRECISION, mem DOUBLE PRECISION)")
        conn.commit()
        sql = f"INSERT INTO raw ({RAW_COLS}) VALUES ({','.join(['%s'] * 13)})"
        t0 = time.perf_counter()
        for b in batches:
            with conn.cursor() as cur:
                cur.executemany(sql, b)
            conn.commit()
        elapsed = time.perf_counter() - t0
    rows = sum(map(len, batches))
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed}


class TempDb:
    """A throwaway PostgreSQL database on the server at ``admin_url``."""

    def __init__(self, admin_url: str) -> None:
        import psycopg
        self.admin_url = admin_url
        self.name = f"lf_bench_{os.getpid()}_{secrets.token_hex(4)}"
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        p = urlsplit(admin_url)
        self.url = urlunsplit((p.scheme, p.netloc, "/" + self.name, p.query, p.fragment))

    def drop(self) -> None:
        import psycopg
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows instead of 100,000")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON document")
    parser.add_argument("--rows", type=int, default=None, help="telemetry rows per backend")
    parser.add_argument("--batch", type=int, default=2000, help="messages per write_batch (ingest's batch_max)")
    parser.add_argument("--pg", default=os.environ.get("LITEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"),
                        help="maintenance database of the PostgreSQL server; 'none' to skip PostgreSQL")
    args = parser.parse_args(argv)
    n_rows = args.rows or (20_000 if args.quick else 100_000)
    batches = make_batches(n_rows, args.batch)
    plain = raw_rows(batches)
    results: dict[str, Any] = {"rows": n_rows, "batch": args.batch, "devices": DEVICES, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = {"ours": bench_ours(os.path.join(tmp, "fleet.db"), batches),
                             "raw": bench_raw_sqlite(os.path.join(tmp, "raw.db"), plain),
                             "ours_docs": bench_ours(os.path.join(tmp, "docs.db"), batches, keep_documents=True)}
    if args.pg != "none":
        try:
            db = TempDb(args.pg)
        except Exception as exc:  # the bench still reports SQLite
            results["postgresql"] = {"error": f"cannot create a database on {args.pg}: {exc}"}
        else:
            try:
                results["postgresql"] = {"ours": bench_ours(db.url, batches), "raw": bench_raw_pg(db.url, plain)}
                db.drop()
                db = TempDb(args.pg)
                results["postgresql"]["ours_docs"] = bench_ours(db.url, batches, keep_documents=True)
            finally:
                db.drop()
    print(f"fleet store write path: {n_rows} telemetry rows (+{n_rows // 1000} events), batches of {args.batch}, "
          f"{DEVICES} devices, {os.cpu_count()} cores")
    print(f"{'backend':<11} {'ours rows/s':>12} {'raw rows/s':>12} {'ours/raw':>9} {'target':>8}  lost  "
          f"{'ours+documents rows/s':>21}")
    ok = True
    for backend in ("sqlite", "postgresql"):
        r = results.get(backend)
        if r is None:
            continue
        if "error" in r:
            print(f"{backend:<11} {r['error']}")
            ok = False
            continue
        ours, raw = r["ours"]["rows_per_s"], r["raw"]["rows_per_s"]
        met = ours >= TARGET_ROWS_S
        ok = ok and met
        print(f"{backend:<11} {ours:>12,.0f} {raw:>12,.0f} {ours / raw:>9.2f} {'met' if met else 'MISSED':>8}  "
              f"{r['ours']['lost']:>4}  {r['ours_docs']['rows_per_s']:>21,.0f}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
