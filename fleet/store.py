"""The fleet's telemetry store: devices, telemetry (raw and rolled up), events, losses, alerts.

SQLite (WAL) by default with no setup; PostgreSQL when given a ``postgresql://`` URL. Both run
the same SQL (fleet/migrations/*.sql, applied in order and recorded in ``schema_migrations``);
the few dialect differences live in :mod:`fleet.db`.

Why the write path looks the way it does: ingest must keep up with 10k telemetry messages per
second on 2 cores, so ``write_batch`` is one transaction of multi-row INSERTs, the numbers are
picked out of each telemetry document with plain dict lookups into tuples, and QoS 1
redeliveries are dropped by ``ON CONFLICT (device_id, seq) DO NOTHING RETURNING``: only the
rows actually inserted update the per-device sequence counters, so a redelivered message is
never counted twice and a gap in a device's sequence numbers is a message lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.db import Database, StoreError, StoreUnavailableError, Tx

__all__ = ["IngestBatch", "Store", "StoreError", "StoreUnavailableError", "WriteResult", "open_store",
           "MIGRATIONS_DIR", "model_label"]

log = logging.getLogger("litefleet.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")

# Event kinds that make a deployment pending and the ones that end it (agent/events.py).
PENDING_KINDS = ("deploy_accepted", "deploy_progress")
DEPLOY_END_KINDS = ("installed", "install_failed", "deploy_rejected", "rolled_back")
DEPLOY_KINDS = PENDING_KINDS + DEPLOY_END_KINDS

MAX_BIGINT = 2**63 - 1
NO_MODEL = "no model"        # series label of telemetry sent while no model was active

_T, _B, _D = "text", "bigint", "double precision"
RAW_COLS = (("device_id", _T), ("seq", _B), ("ts", _D), ("model_version", _T), ("p50_ms", _D), ("p95_ms", _D),
            ("p99_ms", _D), ("inferences_per_s", _D), ("inf_count", _B), ("inf_errors", _B), ("cpu_percent", _D),
            ("temperature_c", _D), ("memory_percent", _D), ("data", _T),
            ("drift_score", _D), ("fb_labels", _B), ("fb_correct", _B))
EVENT_COLS = (("device_id", _T), ("seq", _B), ("ts", _D), ("kind", _T), ("reason", _T), ("command_id", _T),
              ("details", _T))
_SEQ_COLS = (("device_id", _T), ("min_seq", _B), ("max_seq", _B), ("received", _B))

# Rollup columns: (column, aggregate over raw rows, aggregate over rollup rows, how two rows merge).
_M = [("ips", "inferences_per_s", False), ("p50", "p50_ms", False), ("p95", "p95_ms", True),
      ("p99", "p99_ms", True), ("cpu", "cpu_percent", False), ("temp", "temperature_c", True),
      ("mem", "memory_percent", False)]
AGG: list[tuple[str, str, str, str]] = [
    ("samples", "COUNT(*)", "CAST(SUM(samples) AS BIGINT)", "add"),
    ("inf_count", "CAST(SUM(inf_count) AS BIGINT)", "CAST(SUM(inf_count) AS BIGINT)", "add"),
    ("inf_errors", "CAST(SUM(inf_errors) AS BIGINT)", "CAST(SUM(inf_errors) AS BIGINT)", "add"),
]
for _short, _col, _has_max in _M:
    AGG.append((f"{_short}_sum", f"SUM({_col})", f"SUM({_short}_sum)", "add"))
    AGG.append((f"{_short}_n", f"COUNT({_col})", f"CAST(SUM({_short}_n) AS BIGINT)", "add"))
    if _has_max:
        AGG.append((f"{_short}_max", f"MAX({_col})", f"MAX({_short}_max)", "max"))
AGG_COLS = [a[0] for a in AGG]
_AGG_RAW_SELECT = ", ".join(a[1] for a in AGG)
_AGG_ROLL_SELECT = ", ".join(a[2] for a in AGG)
_BUCKET_WIDTH = {"minute": 60.0, "hour": 3600.0}
_SERIES_WIDTHS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)


@dataclass
class IngestBatch:
    """What the ingestor collected since its last flush, in arrival order."""
    statuses: list[tuple[str, dict]] = field(default_factory=list)               # (device_id, status message)
    telemetry: list[tuple[str, int, float, dict]] = field(default_factory=list)  # (device_id, seq, ts, DOC)
    events: list[tuple[str, int, float, dict]] = field(default_factory=list)     # (device_id, seq, ts, event msg)

    def __len__(self) -> int:
        return len(self.statuses) + len(self.telemetry) + len(self.events)


@dataclass(frozen=True)
class WriteResult:
    inserted_telemetry: int
    inserted_events: int
    duplicates: int          # telemetry + events already stored (or repeated within the batch)
    statuses: int = 0        # status messages applied
    rejected: int = 0        # rows dropped because their seq/ts cannot be stored (logged)


def model_label(name: Any, version: Any) -> str:
    """``"digits v3"``: how a model version is named in series, counts and tables."""
    if not name:
        return ""
    return f"{name} v{version}" if version is not None else str(name)


def open_store(url: str, *, migrations_dir: Path | None = None, keep_documents: bool = False) -> "Store":
    """A store on ``url``: ``sqlite:///abs/path.db``, a plain file path, or ``postgresql://...``.

    Does not migrate: call :meth:`Store.migrate` (the server does at start).
    ``keep_documents``: also store each raw telemetry document as JSON (``telemetry_raw.data``,
    returned by ``telemetry(resolution="raw")`` as ``data``); off by default for ingest speed.
    """
    return Store(Database(url), migrations_dir=migrations_dir, keep_documents=keep_documents)


# --------------------------------------------------------------------------- value cleaning

def _num(x: Any) -> float | None:
    """A float a column can hold, else None: one bad field must not fail the whole batch.

    Always a float (never an int): PostgreSQL's array insert wants one type per column.
    """
    c = x.__class__
    if c is float:
        return x if x == x and x not in (math.inf, -math.inf) else None
    if c is int and -1e300 < x < 1e300:
        return float(x)
    return None


def _int(x: Any) -> int | None:
    c = x.__class__
    if c is int:
        return x if -MAX_BIGINT <= x <= MAX_BIGINT else None
    if c is float and x == x and abs(x) < 9e18:
        return int(x)
    return None


def _text(x: Any) -> str:
    """Text PostgreSQL accepts (no NUL characters)."""
    if x is None:
        return ""
    s = x if x.__class__ is str else str(x)
    return s.replace("\x00", "") if "\x00" in s else s


def _obj(x: Any) -> dict:
    return x if x.__class__ is dict else {}


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _dumps(doc: Any) -> str:
    return _encode(doc)


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def _telemetry_row(device_id: str, seq: int, ts: float, doc: dict, keep_document: bool) -> tuple:
    """The telemetry_raw row of one DOC (agent/telemetry.py ``collect()``)."""
    inf = doc.get("inference")
    inf = inf if inf.__class__ is dict else {}
    lat = inf.get("latency_ms")
    lat = lat if lat.__class__ is dict else {}
    sysm = doc.get("system")
    sysm = sysm if sysm.__class__ is dict else {}
    model = doc.get("model")
    label = _text(model_label(model.get("name"), model.get("version"))) if model.__class__ is dict else ""
    total = sysm.get("memory_total_bytes")
    mem = None
    if total.__class__ is int and total > 0:
        avail = sysm.get("memory_available_bytes")
        if avail.__class__ is int:
            mem = round(100.0 * (total - avail) / total, 2)
        else:
            used = sysm.get("memory_used_bytes")
            if used.__class__ is int:
                mem = round(100.0 * used / total, 2)
    return (device_id, seq, ts, label, _num(lat.get("p50")), _num(lat.get("p95")), _num(lat.get("p99")),
            _num(inf.get("inferences_per_s")), _int(inf.get("count")), _int(inf.get("errors")),
            _num(sysm.get("cpu_percent")), _num(sysm.get("temperature_c")), mem,
            _dumps(doc) if keep_document else None, *_quality_figures(doc))


# --------------------------------------------------------------------------- model quality

_NO_QUALITY = (None, None, None)
MAX_CLASSES = 1000          # a larger confusion matrix is not stored (it would not fit a message anyway)


def _confusion(value: Any) -> list[list[int]] | None:
    """A square matrix of non-negative ints (rows = true label, columns = predicted), else None."""
    if value.__class__ is not list or not 0 < len(value) <= MAX_CLASSES:
        return None
    n = len(value)
    for row in value:
        if row.__class__ is not list or len(row) != n:
            return None
        for v in row:
            if v.__class__ is not int or v < 0 or v > MAX_BIGINT:
                return None
    return value


def _quality_figures(doc: dict) -> tuple:
    """(drift score, labels, correct) of a telemetry DOC's ``drift`` and ``feedback`` (contract in docs/quality.md)."""
    drift = doc.get("drift")
    feedback = doc.get("feedback")
    if drift is None and feedback is None:
        return _NO_QUALITY
    score = _num(drift.get("score")) if drift.__class__ is dict else None
    labels = correct = None
    if feedback.__class__ is dict:
        matrix = _confusion(feedback.get("confusion"))
        if matrix is not None:
            labels = sum(sum(row) for row in matrix)
            correct = sum(matrix[i][i] for i in range(len(matrix)))
    return (score, labels, correct)


def _model_ref(part: dict, doc: dict) -> tuple[str, int] | None:
    """(name, version) a drift/feedback report is about: its own ``model``, else the telemetry's."""
    for model in (part.get("model"), doc.get("model")):
        if model.__class__ is dict:
            name, version = _text(model.get("name")), _int(model.get("version"))
            if name and version is not None:
                return name, version
    return None


def _quality_rows(reports: list[tuple[str, float, dict]]) -> list[tuple]:
    """model_quality upsert rows from (device_id, ts, telemetry DOC): the newest drift and feedback per key."""
    merged: dict[tuple[str, str, int], list] = {}
    for device_id, ts, doc in reports:
        drift, feedback = doc.get("drift"), doc.get("feedback")
        if drift.__class__ is dict and _num(drift.get("score")) is not None:
            ref = _model_ref(drift, doc)
            if ref is not None:
                row = merged.setdefault((device_id, *ref), [None] * 10)
                if row[0] is None or ts >= row[0]:
                    row[0:5] = [ts, _num(drift.get("score")), _num(drift.get("inputs")), _num(drift.get("outputs")),
                                _int(drift.get("window"))]
        if feedback.__class__ is dict:
            matrix = _confusion(feedback.get("confusion"))
            ref = _model_ref(feedback, doc)
            if matrix is not None and ref is not None:
                row = merged.setdefault((device_id, *ref), [None] * 10)
                if row[5] is None or ts >= row[5]:
                    row[5:10] = [ts, _int(feedback.get("labels")), _int(feedback.get("unmatched")), len(matrix),
                                 _dumps(matrix)]
    return [(*key, *values) for key, values in merged.items()]


def _valid_key(device_id: Any, seq: Any, ts: Any) -> bool:
    return (device_id.__class__ is str and bool(device_id) and seq.__class__ is int and 0 <= seq <= MAX_BIGINT
            and ts.__class__ in (float, int) and ts == ts and abs(ts) < 1e12)


def _merge_max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def _merge_agg(into: list, row: Sequence) -> None:
    """Add one aggregate row (in AGG_COLS order) into ``into``."""
    for i, spec in enumerate(AGG):
        v = row[i]
        if spec[3] == "max":
            into[i] = _merge_max(into[i], v)
        elif v is not None:
            into[i] = (into[i] or 0) + v


def _ratio(total: Any, n: Any) -> float | None:
    return float(total) / n if n and total is not None else None


def _agg_to_row(device_id: str, bucket: float, model_version: str, agg: Sequence, resolution: str) -> dict:
    a = dict(zip(AGG_COLS, agg))
    return {
        "ts": float(bucket), "device_id": device_id, "model_version": model_version or None,
        "resolution": resolution, "samples": int(a["samples"] or 0),
        "p50_ms": _ratio(a["p50_sum"], a["p50_n"]), "p95_ms": _ratio(a["p95_sum"], a["p95_n"]),
        "p99_ms": _ratio(a["p99_sum"], a["p99_n"]), "p95_max_ms": a["p95_max"], "p99_max_ms": a["p99_max"],
        "inferences_per_s": _ratio(a["ips_sum"], a["ips_n"]),
        "count": int(a["inf_count"]) if a["inf_count"] is not None else None,
        "errors": int(a["inf_errors"]) if a["inf_errors"] is not None else None,
        "cpu_percent": _ratio(a["cpu_sum"], a["cpu_n"]), "temperature_c": _ratio(a["temp_sum"], a["temp_n"]),
        "temperature_max_c": a["temp_max"], "memory_percent": _ratio(a["mem_sum"], a["mem_n"]),
    }


# --------------------------------------------------------------------------- the store

class Store:
    """The fleet store on one database; safe to share between threads."""

    def __init__(self, db: Database, *, migrations_dir: Path | None = None, keep_documents: bool = False) -> None:
        self.db = db
        # Whole telemetry documents cost a JSON encoding per row (~18 us: as much as the rest of
        # the write path), so by default only the extracted figures are kept.
        self.keep_documents = keep_documents
        self.backend: str = db.backend
        self.migrations_dir = Path(migrations_dir) if migrations_dir else MIGRATIONS_DIR
        self._insert_sql: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"<Store {self.backend} {self.db.describe()}>"

    def close(self) -> None:
        self.db.close()

    # schema ------------------------------------------------------------------------------

    def migrations(self) -> list[tuple[int, str, Path]]:
        """``(version, name, path)`` of every migration file, in order."""
        found = []
        for path in sorted(self.migrations_dir.glob("*.sql")):
            m = _MIGRATION_NAME.match(path.name)
            if not m:
                raise StoreError(f"{path}: a migration file must be named NNNN_name.sql")
            found.append((int(m.group(1)), m.group(2), path))
        versions = [v for v, _, _ in found]
        if len(set(versions)) != len(versions):
            raise StoreError(f"{self.migrations_dir}: two migration files share a version number")
        return found

    def schema_version(self) -> int:
        with self.db.transaction() as tx:
            return self._applied_version(tx)

    def _applied_version(self, tx: Tx) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                   "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
        row = tx.query("SELECT MAX(version) FROM schema_migrations")
        return int(row[0][0] or 0)

    def migrate(self) -> int:
        """Apply the pending migrations in order, each in its own transaction; the schema version.

        Idempotent and safe to run from several server processes at once (they serialise on a
        lock). Refuses a database whose schema is newer than this code knows.
        """
        files = self.migrations()
        known = files[-1][0] if files else 0
        while True:
            with self.db.transaction(write=True) as tx:
                self.db.lock_for(tx, "lf-migr")
                current = self._applied_version(tx)
                if current > known:
                    raise StoreError(f"database {self.db.describe()} has schema version {current}, newer than "
                                     f"this litefleet knows ({known}): upgrade litefleet")
                pending = [f for f in files if f[0] > current]
                if not pending:
                    return current
                version, name, path = pending[0]
                try:
                    tx.script(path.read_text())
                except StoreUnavailableError:
                    raise
                except Exception as exc:
                    raise StoreError(f"{path}: migration {version} failed: {exc}") from exc
                tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                           (version, name, time.time()))
                log.info("store: applied migration %04d_%s", version, name)

    # ingest ------------------------------------------------------------------------------

    def write_batch(self, batch: IngestBatch) -> WriteResult:
        """Store one batch in one transaction; rows already stored (same device_id+seq) are ignored.

        Statuses are applied in arrival order (a last will carries the time its connection
        was opened, so its ``ts`` cannot order it against the birth). The latest telemetry
        figures are copied onto the device's row when newer than what it has.
        """
        rejected = 0
        keep = self.keep_documents
        tel_rows: dict[tuple[str, int], tuple] = {}
        with_quality: set[tuple[str, int]] = set()     # rows carrying a drift or feedback report
        for device_id, seq, ts, doc in batch.telemetry:
            if not _valid_key(device_id, seq, ts):
                rejected += 1
                continue
            if (device_id, seq) not in tel_rows:
                doc = _obj(doc)
                row = _telemetry_row(_text(device_id), seq, float(ts), doc, keep)
                tel_rows[(device_id, seq)] = (row, doc)
                if row[14] is not None or row[15] is not None:
                    with_quality.add((device_id, seq))
        ev_rows: dict[tuple[str, int], tuple] = {}
        for device_id, seq, ts, msg in batch.events:
            if not _valid_key(device_id, seq, ts):
                rejected += 1
                continue
            if (device_id, seq) not in ev_rows:
                msg = _obj(msg)
                ev_rows[(device_id, seq)] = (_text(device_id), seq, float(ts), _text(msg.get("kind")),
                                             _text(msg.get("reason")), _text(msg.get("command_id")),
                                             _dumps(_obj(msg.get("details"))))
        if rejected:
            log.warning("store: dropped %d message(s) whose device_id/seq/ts cannot be stored", rejected)
        offered = len(batch.telemetry) + len(batch.events) - rejected
        status_rows = [self._status_row(device_id, _obj(msg)) for device_id, msg in batch.statuses
                       if device_id.__class__ is str and device_id]
        now = time.time()

        with self.db.transaction(write=True) as tx:
            for row in status_rows:
                self._apply_status(tx, row, now)
            inserted_tel = self.db.insert_rows(tx, "telemetry_raw", RAW_COLS, [v[0] for v in tel_rows.values()],
                                        tail="ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
                                        returning=True)
            inserted_ev = self.db.insert_rows(tx, "events", EVENT_COLS, list(ev_rows.values()),
                                       tail="ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq, ts",
                                       returning=True)
            # Upserts below go in device order, so that two writers (shared subscriptions) lock
            # the same rows in the same order and never deadlock each other.
            # Per device: the range and number of sequence numbers actually inserted.
            # Telemetry and events share one sequence space per device.
            seqs: dict[str, list[int]] = {}
            for device_id, seq, *_ in itertools.chain(inserted_tel, inserted_ev):
                s = seqs.get(device_id)
                if s is None:
                    seqs[device_id] = [seq, seq, 1]
                else:
                    if seq < s[0]:
                        s[0] = seq
                    if seq > s[1]:
                        s[1] = seq
                    s[2] += 1
            ev_seen: dict[str, float] = {}
            for device_id, _seq, ts in inserted_ev:
                if ts > ev_seen.get(device_id, -math.inf):
                    ev_seen[device_id] = ts
            if seqs:
                self.db.insert_rows(tx, "device_seq", _SEQ_COLS,
                             [(d, s[0], s[1], s[2]) for d, s in sorted(seqs.items())],
                             tail="ON CONFLICT (device_id) DO UPDATE SET "
                                  "min_seq = CASE WHEN excluded.min_seq < device_seq.min_seq "
                                  "THEN excluded.min_seq ELSE device_seq.min_seq END, "
                                  "max_seq = CASE WHEN excluded.max_seq > device_seq.max_seq "
                                  "THEN excluded.max_seq ELSE device_seq.max_seq END, "
                                  "received = device_seq.received + excluded.received")
            # Drift and feedback reports of the inserted rows: the latest per device and model version.
            reports = [(key[0], tel_rows[(key[0], key[1])][0][2], tel_rows[(key[0], key[1])][1])
                       for key in inserted_tel if (key[0], key[1]) in with_quality] if with_quality else None
            if reports:
                self.db.insert_rows(tx, "model_quality", _QUALITY_COLS, sorted(_quality_rows(reports)),
                                    tail=_QUALITY_UPSERT)
            # Latest telemetry per device among the inserted rows.
            latest: dict[str, tuple] = {}
            for key in inserted_tel:
                row_doc = tel_rows[(key[0], key[1])]
                cur = latest.get(key[0])
                if cur is None or (row_doc[0][2], row_doc[0][1]) > (cur[0][2], cur[0][1]):
                    latest[key[0]] = row_doc
            if latest:
                self.db.insert_rows(tx, "devices", _LATEST_COLS,
                             [self._latest_row(row, doc, seen=max(row[2], ev_seen.pop(d, -math.inf)))
                              for d, (row, doc) in sorted(latest.items())],
                             tail=_LATEST_UPSERT)
            if ev_seen:
                self.db.insert_rows(tx, "devices", (("device_id", "text"), ("last_seen", "double precision")),
                                    sorted(ev_seen.items()),
                             tail="ON CONFLICT (device_id) DO UPDATE SET last_seen = CASE WHEN devices.last_seen "
                                  "IS NULL OR excluded.last_seen > devices.last_seen THEN excluded.last_seen "
                                  "ELSE devices.last_seen END")
        n_tel, n_ev = len(inserted_tel), len(inserted_ev)
        return WriteResult(n_tel, n_ev, offered - n_tel - n_ev, len(status_rows), rejected)

    @staticmethod
    def _latest_row(tel: tuple, doc: dict, *, seen: float) -> tuple:
        """The devices-row upsert of a device's newest telemetry row in the batch."""
        device_id, seq, ts = tel[0], tel[1], tel[2]
        model = doc.get("model")
        engine = _obj(doc.get("engine"))
        if model.__class__ is dict:
            name, version, sha = _text(model.get("name")) or None, _int(model.get("version")), \
                _text(model.get("sha256")) or None
        else:
            name = version = sha = None
        return (device_id, seen, ts, seq, ts, name, version, sha, _text(engine.get("runtime")) or None,
                _text(engine.get("runtime_version")) or None, _text(engine.get("delegate")) or None, *tel[4:13])

    @staticmethod
    def _status_row(device_id: str, msg: dict) -> tuple:
        state = msg.get("state")
        ts = _num(msg.get("ts"))
        if state != "online":
            return ("offline", _text(device_id), ts, _text(msg.get("reason")))
        model = _obj(msg.get("active_model")) or None
        runtime = _obj(msg.get("runtime"))
        engine = _obj(msg.get("engine"))
        groups = [str(g) for g in msg.get("groups") or [] if isinstance(g, str)]
        birth = {k: msg.get(k) for k in ("engine", "hardware", "runtime", "delegates_available", "active_model",
                                         "public_keys")}
        return ("online", _text(device_id), ts, _text(msg.get("fleet")), _text(msg.get("profile")),
                _dumps(groups), _dumps(_obj(msg.get("labels"))), _text(msg.get("agent_version")),
                _text(model.get("name")) or None if model else None, _int(model.get("version")) if model else None,
                _text(model.get("sha256")) or None if model else None,
                _text(runtime.get("name")) or None, _text(runtime.get("version")) or None,
                _text(engine.get("delegate")) or None,
                _dumps([d for d in msg.get("delegates_available") or [] if isinstance(d, str)]),
                _text(_dumps(birth)))

    @staticmethod
    def _apply_status(tx: Tx, row: tuple, now: float) -> None:
        if row[0] == "offline":
            _, device_id, ts, reason = row
            tx.execute("INSERT INTO devices (device_id, online, status_ts, status_received, offline_reason) "
                       "VALUES (?, 0, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET online = 0, "
                       "status_ts = excluded.status_ts, status_received = excluded.status_received, "
                       "offline_reason = excluded.offline_reason", (device_id, ts, now, reason))
            return
        (_, device_id, ts, fleet, profile, groups, labels, agent_version, mname, mversion, msha, runtime,
         runtime_version, delegate, delegates, birth) = row
        tx.execute(
            "INSERT INTO devices (device_id, online, status_ts, status_received, offline_reason, last_seen, fleet, "
            "profile, groups_json, labels_json, agent_version, model_ts, model_name, model_version, model_sha256, "
            "runtime, runtime_version, delegate, delegates_json, birth_json) "
            "VALUES (?, 1, ?, ?, '', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET online = 1, status_ts = excluded.status_ts, "
            "status_received = excluded.status_received, offline_reason = '', "
            "last_seen = CASE WHEN devices.last_seen IS NULL OR excluded.last_seen > devices.last_seen "
            "THEN excluded.last_seen ELSE devices.last_seen END, fleet = excluded.fleet, profile = excluded.profile, "
            "groups_json = excluded.groups_json, labels_json = excluded.labels_json, "
            "agent_version = excluded.agent_version, delegates_json = excluded.delegates_json, "
            "birth_json = excluded.birth_json, " + _NEWER_MODEL,
            (device_id, ts, now, ts, fleet, profile, groups, labels, agent_version, ts, mname, mversion, msha,
             runtime, runtime_version, delegate, delegates, birth))

    # reads: devices ----------------------------------------------------------------------

    def devices(self, *, group: str | None = None, profile: str | None = None) -> list[dict]:
        """Every known device (optionally of one group / profile), sorted by id."""
        where, params = "", []
        if profile:
            where, params = " WHERE d.profile = ?", [profile]
        with self.db.transaction() as tx:
            rows = tx.query_dicts(_DEVICE_SELECT + where + " ORDER BY d.device_id", params)
            pending = self._pending(tx)
        out = [self._device_dict(r, pending.get(r["device_id"])) for r in rows]
        if group:
            out = [d for d in out if group in d["groups"]]
        return out

    def device(self, device_id: str) -> dict | None:
        """One device with its birth details (engine report, hardware), or None if unknown."""
        with self.db.transaction() as tx:
            rows = tx.query_dicts(_DEVICE_SELECT + " WHERE d.device_id = ?", [device_id])
            if not rows:
                return None
            pending = self._pending(tx, device_id)
        d = self._device_dict(rows[0], pending.get(device_id))
        birth = _loads(rows[0]["birth_json"], {})
        d["engine"] = birth.get("engine") or {}
        d["hardware"] = birth.get("hardware") or {}
        return d

    def device_keys(self) -> list[dict]:
        """Every device's reported public keys (from its latest birth; kept while it is offline), by id."""
        with self.db.transaction() as tx:
            rows = tx.query_dicts("SELECT device_id, fleet, profile, groups_json, online, status_ts, birth_json "
                                  "FROM devices ORDER BY device_id", [])
        return [{"device_id": r["device_id"], "fleet": r["fleet"], "profile": r["profile"],
                 "groups": _loads(r["groups_json"], []), "online": bool(r["online"]), "status_ts": r["status_ts"],
                 "public_keys": _obj(_loads(r["birth_json"], {}).get("public_keys"))} for r in rows]

    def _pending(self, tx: Tx, device_id: str | None = None) -> dict[str, dict]:
        """device_id -> the deployment in progress (its last deploy event is accepted/progress)."""
        marks = ",".join("?" * len(DEPLOY_KINDS))
        sub_where = f"kind IN ({marks})" + (" AND device_id = ?" if device_id else "")
        params: list[Any] = list(DEPLOY_KINDS) + ([device_id] if device_id else [])
        rows = tx.query(
            "SELECT e.device_id, e.kind, e.ts, e.command_id, e.reason, e.details FROM events e JOIN "
            f"(SELECT device_id, MAX(seq) AS seq FROM events WHERE {sub_where} GROUP BY device_id) last "
            "ON e.device_id = last.device_id AND e.seq = last.seq", params)
        out = {}
        for dev, kind, ts, command_id, reason, details in rows:
            if kind in PENDING_KINDS:
                det = _loads(details, {})
                out[dev] = {"kind": kind, "since": ts, "command_id": command_id or None, "reason": reason,
                            "percent": det.get("percent"), "name": det.get("name"), "version": det.get("version"),
                            "details": det}
        return out

    @staticmethod
    def _device_dict(r: dict, pending: dict | None) -> dict:
        model = None
        if r["model_name"]:
            model = {"name": r["model_name"], "version": r["model_version"], "sha256": r["model_sha256"]}
        lost = 0
        if r["received"] is not None:
            lost = int(r["max_seq"] - r["min_seq"] + 1 - r["received"])
        return {
            "device_id": r["device_id"], "fleet": r["fleet"], "profile": r["profile"],
            "groups": _loads(r["groups_json"], []), "labels": _loads(r["labels_json"], {}),
            "online": bool(r["online"]), "state": "online" if r["online"] else "offline",
            "last_seen": r["last_seen"], "status_ts": r["status_ts"], "status_received": r["status_received"],
            "offline_reason": r["offline_reason"] or None, "agent_version": r["agent_version"],
            "model": model, "model_version": model_label(r["model_name"], r["model_version"]) or None,
            "runtime": r["runtime"], "runtime_version": r["runtime_version"], "delegate": r["delegate"],
            "delegates_available": _loads(r["delegates_json"], []),
            "telemetry_ts": r["latest_ts"], "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"],
            "inferences_per_s": r["inferences_per_s"], "count": r["inf_count"], "errors": r["inf_errors"],
            "cpu_percent": r["cpu_percent"], "temperature_c": r["temperature_c"],
            "memory_percent": r["memory_percent"], "pending_deployment": pending,
            "received": int(r["received"] or 0), "lost": lost,
            "drift": ({"score": r["drift_score"], "inputs": r["drift_inputs"], "outputs": r["drift_outputs"],
                       "window": r["drift_window"], "ts": r["drift_ts"]} if r.get("drift_score") is not None else None),
            "feedback_labels": r.get("fb_labels"),
        }

    # reads: telemetry --------------------------------------------------------------------

    def telemetry(self, device_id: str | None, *, since: float, until: float | None = None,
                  resolution: str = "auto") -> list[dict]:
        """Telemetry of one device (or all with None) in [since, until), oldest first.

        ``raw``: the raw rows still kept. ``minute`` / ``hour``: buckets of that width merged
        from the rollup tables and the raw rows not yet rolled up. ``auto``: raw rows plus the
        rollup rows that replaced older raw rows when the range is at most 3 hours, minute
        buckets up to 3 days, hour buckets beyond. Every row says its ``resolution``.
        """
        until = time.time() + 1 if until is None else until
        if resolution not in ("auto", "raw", "minute", "hour"):
            raise StoreError(f"resolution {resolution!r} is not one of auto, raw, minute, hour")
        if resolution == "auto":
            span = until - since
            if span > 3 * 86400:
                return self._bucketed(device_id, since, until, "hour")
            if span > 3 * 3600:
                return self._bucketed(device_id, since, until, "minute") + \
                    self._rollup_rows(device_id, since, until, "hour", sort=False)
            rows = self._raw(device_id, since, until) + self._rollup_rows(device_id, since, until, "minute", False) \
                + self._rollup_rows(device_id, since, until, "hour", False)
            rows.sort(key=lambda r: (r["ts"], r["device_id"]))
            return rows
        if resolution == "raw":
            return self._raw(device_id, since, until)
        return self._bucketed(device_id, since, until, resolution)

    def _raw(self, device_id: str | None, since: float, until: float) -> list[dict]:
        where, params = _range("ts", device_id, since, until)
        with self.db.transaction() as tx:
            rows = tx.query_dicts(
                "SELECT device_id, seq, ts, model_version, p50_ms, p95_ms, p99_ms, inferences_per_s, "
                "inf_count, inf_errors, cpu_percent, temperature_c, memory_percent, data, drift_score, fb_labels, "
                f"fb_correct FROM telemetry_raw WHERE {where} ORDER BY ts, device_id", params)
        for r in rows:
            data = r.pop("data")
            if data is not None:
                r["data"] = _loads(data, None)
            r["model_version"] = r["model_version"] or None
            r["count"] = r.pop("inf_count")
            r["errors"] = r.pop("inf_errors")
            r["drift"] = r.pop("drift_score")
            r["feedback_labels"] = r.pop("fb_labels")
            r["feedback_correct"] = r.pop("fb_correct")
            r["resolution"] = "raw"
        return rows

    def _rollup_rows(self, device_id: str | None, since: float, until: float, table: str,
                     sort: bool = True) -> list[dict]:
        where, params = _range("bucket", device_id, since, until)
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT device_id, bucket, model_version, {', '.join(AGG_COLS)} "
                            f"FROM telemetry_{table} WHERE {where} ORDER BY bucket, device_id", params)
        return [_agg_to_row(r[0], r[1], r[2], r[3:], table) for r in rows]

    def _bucketed(self, device_id: str | None, since: float, until: float, resolution: str) -> list[dict]:
        """Buckets of ``resolution`` merged from every table that holds data of the range."""
        width = _BUCKET_WIDTH[resolution]
        sources = [("telemetry_raw", "ts", _AGG_RAW_SELECT), ("telemetry_minute", "bucket", _AGG_ROLL_SELECT)]
        if resolution == "hour":
            sources.append(("telemetry_hour", "bucket", _AGG_ROLL_SELECT))
        merged: dict[tuple, list] = {}
        with self.db.transaction() as tx:
            for table, col, select in sources:
                if table == f"telemetry_{resolution}":
                    select = ", ".join(AGG_COLS)
                    bucket, group = "bucket", ""
                else:
                    bucket = self.db.bucket_expr(col, width)
                    group = " GROUP BY 1, 2, 3"
                where, params = _range(col, device_id, since, until)
                for r in tx.query(f"SELECT device_id, {bucket}, model_version, {select} FROM {table} "
                                  f"WHERE {where}{group}", params):
                    key = (r[0], float(r[1]), r[2])
                    acc = merged.get(key)
                    if acc is None:
                        merged[key] = list(r[3:])
                    else:
                        _merge_agg(acc, r[3:])
        rows = [_agg_to_row(k[0], k[1], k[2], v, resolution) for k, v in merged.items()]
        rows.sort(key=lambda r: (r["ts"], r["device_id"], r["model_version"] or ""))
        return rows

    def series(self, *, since: float, metric: str, by: str = "model_version", until: float | None = None,
               buckets: int = 60) -> dict[str, list[tuple[float, float]]]:
        """Fleet-wide series in about ``buckets`` buckets over [since, until): label -> [(bucket start, value)].

        ``p95_ms``: the mean of the devices' p95 latencies in the bucket. ``inferences_per_s``:
        the fleet's throughput, i.e. the sum over devices of each device's mean rate in the
        bucket (independent of how often devices report and of the table the data is in).
        ``by``: ``model_version`` ("digits v3"; telemetry without a model is "no model") or ``all``.
        """
        if metric not in ("p95_ms", "inferences_per_s"):
            raise StoreError(f"metric {metric!r} is not one of p95_ms, inferences_per_s")
        if by not in ("model_version", "all"):
            raise StoreError(f"by {by!r} is not one of model_version, all")
        until = time.time() if until is None else until
        span = max(until - since, 1.0)
        width = next((w for w in _SERIES_WIDTHS if w * max(buckets, 1) >= span), _SERIES_WIDTHS[-1])
        if metric == "p95_ms":
            parts = ["SELECT ts AS t, model_version AS mv, device_id AS dev, p95_ms AS s, "
                     "CASE WHEN p95_ms IS NULL THEN 0 ELSE 1 END AS n FROM telemetry_raw WHERE ts >= ? AND ts < ?"]
            parts += [f"SELECT bucket AS t, model_version AS mv, device_id AS dev, p95_sum AS s, p95_n AS n "
                      f"FROM telemetry_{t} WHERE bucket >= ? AND bucket < ?" for t in ("minute", "hour")]
        else:
            parts = ["SELECT ts AS t, model_version AS mv, device_id AS dev, inferences_per_s AS s, "
                     "CASE WHEN inferences_per_s IS NULL THEN 0 ELSE 1 END AS n FROM telemetry_raw "
                     "WHERE ts >= ? AND ts < ?"]
            parts += [f"SELECT bucket AS t, model_version AS mv, device_id AS dev, ips_sum AS s, ips_n AS n "
                      f"FROM telemetry_{t} WHERE bucket >= ? AND bucket < ?" for t in ("minute", "hour")]
        union = " UNION ALL ".join(parts)
        b = self.db.bucket_expr("t", width)
        if metric == "p95_ms":
            sql = (f"SELECT b, mv, SUM(s) / NULLIF(SUM(n), 0) FROM (SELECT {b} AS b, mv, s, n FROM ({union}) u) x "
                   "GROUP BY b, mv")
        else:
            sql = (f"SELECT b, mv, SUM(dev_rate) FROM (SELECT {b} AS b, mv, dev, SUM(s) / NULLIF(SUM(n), 0) AS dev_rate "
                   f"FROM ({union}) u GROUP BY 1, 2, 3) x GROUP BY b, mv")
        params = [since, until] * 3
        with self.db.transaction() as tx:
            rows = tx.query(sql, params)
        acc: dict[str, dict[float, list[float]]] = {}
        for bucket, mv, value in rows:
            if value is None:
                continue
            label = "all" if by == "all" else (mv or NO_MODEL)
            acc.setdefault(label, {}).setdefault(float(bucket), []).append(float(value))
        out: dict[str, list[tuple[float, float]]] = {}
        for label, points in acc.items():
            # by=all merges model versions: rates add up, latencies average.
            out[label] = [(t, sum(v) if metric == "inferences_per_s" else sum(v) / len(v))
                          for t, v in sorted(points.items())]
        return out

    # reads: model quality ---------------------------------------------------------------

    def quality(self, *, model_name: str | None = None, model_version: int | None = None,
                device_id: str | None = None) -> list[dict]:
        """Latest drift and cumulative confusion per device and model version (docs/quality.md).

        Rows sorted by model, version, device: ``device_id``, ``model_name``, ``model_version``,
        ``drift`` ({score, inputs, outputs, window, ts} or None) and ``feedback`` ({labels,
        unmatched, classes, confusion, ts} or None), plus the device's ``profile`` and whether it
        runs that version now (``current``).
        """
        clauses, params = [], []
        for col, value in (("q.model_name", model_name), ("q.model_version", model_version),
                           ("q.device_id", device_id)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self.db.transaction() as tx:
            rows = tx.query_dicts(
                "SELECT q.*, d.profile, d.model_name AS cur_name, d.model_version AS cur_version FROM model_quality q "
                f"LEFT JOIN devices d ON d.device_id = q.device_id{where} "
                "ORDER BY q.model_name, q.model_version, q.device_id", params)
        out = []
        for r in rows:
            drift = None
            if r["drift_score"] is not None:
                drift = {"score": r["drift_score"], "inputs": r["drift_inputs"], "outputs": r["drift_outputs"],
                         "window": r["drift_window"], "ts": r["drift_ts"]}
            feedback = None
            if r["confusion_json"]:
                feedback = {"labels": r["labels"], "unmatched": r["unmatched"], "classes": r["classes"],
                            "confusion": _loads(r["confusion_json"], []), "ts": r["feedback_ts"]}
            out.append({"device_id": r["device_id"], "model_name": r["model_name"],
                        "model_version": int(r["model_version"]), "profile": r["profile"] or "",
                        "current": r["cur_name"] == r["model_name"] and r["cur_version"] == r["model_version"],
                        "drift": drift, "feedback": feedback})
        return out

    # reads: events, losses, counts ------------------------------------------------------

    def events(self, *, device_id: str | None = None, command_id: str | None = None,
               kinds: list[str] | None = None, since: float | None = None, limit: int = 200) -> list[dict]:
        """Events matching every filter given, newest first, at most ``limit`` (1..10000)."""
        clauses, params = [], []
        if device_id:
            clauses.append("device_id = ?")
            params.append(device_id)
        if command_id:
            clauses.append("command_id = ?")
            params.append(command_id)
        if kinds:
            clauses.append(f"kind IN ({','.join('?' * len(kinds))})")
            params.extend(kinds)
        if since is not None:
            clauses.append("ts >= ?")
            params.append(float(since))
        limit = max(1, min(int(limit), 10_000))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self.db.transaction() as tx:
            rows = tx.query_dicts("SELECT device_id, seq, ts, kind, reason, command_id, details FROM events"
                                  f"{where} ORDER BY ts DESC, seq DESC LIMIT ?", params + [limit])
        for r in rows:
            r["details"] = _loads(r["details"], {})
            r["command_id"] = r["command_id"] or None
        return rows

    def losses(self) -> dict[str, dict]:
        """device_id -> {received, min_seq, max_seq, lost}; lost = the gaps in its sequence numbers."""
        with self.db.transaction() as tx:
            rows = tx.query("SELECT device_id, min_seq, max_seq, received FROM device_seq ORDER BY device_id")
        return {d: {"received": int(n), "min_seq": int(lo), "max_seq": int(hi), "lost": int(hi - lo + 1 - n)}
                for d, lo, hi, n in rows}

    def counts(self) -> dict:
        """Aggregates for /metrics: devices by state, by model version, by profile; totals of losses, alerts."""
        with self.db.transaction() as tx:
            by_state = dict(tx.query("SELECT online, COUNT(*) FROM devices GROUP BY online"))
            models = tx.query("SELECT model_name, model_version, online, COUNT(*) FROM devices "
                              "GROUP BY model_name, model_version, online")
            profiles = tx.query("SELECT profile, online, COUNT(*) FROM devices GROUP BY profile, online")
            seq = tx.query("SELECT CAST(SUM(received) AS BIGINT), CAST(SUM(max_seq - min_seq + 1 - received) "
                           "AS BIGINT) FROM device_seq")[0]
            open_alerts = tx.query("SELECT kind, COUNT(*) FROM alerts WHERE closed_at IS NULL GROUP BY kind")
        online, offline = int(by_state.get(1, 0)), int(by_state.get(0, 0))
        by_model: dict[str, dict[str, int]] = {}
        for name, version, on, n in models:
            entry = by_model.setdefault(model_label(name, version) or "none", {"online": 0, "offline": 0})
            entry["online" if on else "offline"] += int(n)
        by_profile: dict[str, dict[str, int]] = {}
        for prof, on, n in profiles:
            entry = by_profile.setdefault(prof or "unknown", {"online": 0, "offline": 0})
            entry["online" if on else "offline"] += int(n)
        return {"online": online, "offline": offline, "total": online + offline,
                "by_state": {"online": online, "offline": offline},
                "by_model_version": {k: v["online"] + v["offline"] for k, v in by_model.items()},
                "by_model_version_state": by_model,
                "by_profile": {k: v["online"] + v["offline"] for k, v in by_profile.items()},
                "by_profile_state": by_profile,
                "received": int(seq[0] or 0), "lost": int(seq[1] or 0),
                "alerts_open": {k: int(n) for k, n in open_alerts}}

    # retention ---------------------------------------------------------------------------

    def rollup(self, now: float, *, raw_retention_s: float, minute_retention_s: float,
               hour_retention_s: float | None = None) -> dict:
        """Move raw rows older than the raw window into minute buckets, minute rows older than the
        minute window into hour buckets (and drop hour rows beyond ``hour_retention_s`` if given).

        Cut-offs are aligned down to whole minutes / hours so a bucket normally moves in one
        go; a late row for a bucket already rolled is added to it, so running this any number
        of times never loses or double-counts a row. Returns the rows rolled and deleted.
        """
        if raw_retention_s < 0 or minute_retention_s < 0 or (hour_retention_s is not None and hour_retention_s < 0):
            raise StoreError("retention windows must be >= 0 seconds")
        raw_cut = math.floor((now - raw_retention_s) / 60.0) * 60.0
        minute_cut = math.floor((now - minute_retention_s) / 3600.0) * 3600.0
        result = {"raw_cutoff": raw_cut, "minute_cutoff": minute_cut}
        # One snapshot for the INSERT ... SELECT and the DELETE: a row ingested between them is
        # neither counted nor deleted (PostgreSQL); SQLite's write lock gives the same.
        with self.db.transaction(write=True, snapshot=True) as tx:
            if not self.db.try_lock_for(tx, "lf-rollup"):
                result["skipped"] = "another process is rolling up"
                return result
            tx.execute(_rollup_sql(self.db, "telemetry_raw", "ts", "telemetry_minute", 60.0, _AGG_RAW_SELECT),
                       (raw_cut,))
            result["minute_rows_written"] = max(tx.rowcount, 0)
            tx.execute("DELETE FROM telemetry_raw WHERE ts < ?", (raw_cut,))
            result["raw_deleted"] = max(tx.rowcount, 0)
            tx.execute(_rollup_sql(self.db, "telemetry_minute", "bucket", "telemetry_hour", 3600.0,
                                   _AGG_ROLL_SELECT), (minute_cut,))
            result["hour_rows_written"] = max(tx.rowcount, 0)
            tx.execute("DELETE FROM telemetry_minute WHERE bucket < ?", (minute_cut,))
            result["minute_deleted"] = max(tx.rowcount, 0)
            result["hour_deleted"] = 0
            if hour_retention_s is not None:
                tx.execute("DELETE FROM telemetry_hour WHERE bucket < ?", (now - hour_retention_s,))
                result["hour_deleted"] = max(tx.rowcount, 0)
        return result

    def table_sizes(self) -> dict[str, int]:
        """Row counts of the telemetry tables (for tests, /metrics and the bench)."""
        with self.db.transaction() as tx:
            return {t: int(tx.query(f"SELECT COUNT(*) FROM {t}")[0][0])
                    for t in ("telemetry_raw", "telemetry_minute", "telemetry_hour", "events", "devices")}

    # alerts ------------------------------------------------------------------------------

    def record_alert(self, alert: dict) -> bool:
        """Open, refresh or close the alert ``(device_id, kind)``.

        ``alert``: ``{"device_id", "kind", "open": bool, "message", "details", "ts"?}``. Returns
        True when the state changed: a new alert was opened, or an open one was closed; False
        when an open alert was only refreshed (message, details) or there was nothing to close.
        """
        kind = _text(alert.get("kind"))
        if not kind:
            raise StoreError("alert: 'kind' is required")
        device_id = _text(alert.get("device_id"))
        ts = _num(alert.get("ts")) or time.time()
        message = _text(alert.get("message"))
        details = _dumps(_obj(alert.get("details")))
        with self.db.transaction(write=True) as tx:
            if not alert.get("open", True):
                tx.execute("UPDATE alerts SET closed_at = ?, updated_at = ? WHERE device_id = ? AND kind = ? "
                           "AND closed_at IS NULL", (ts, ts, device_id, kind))
                return tx.rowcount > 0
            tx.execute("UPDATE alerts SET message = ?, details = ?, updated_at = ? WHERE device_id = ? AND kind = ? "
                       "AND closed_at IS NULL", (message, details, ts, device_id, kind))
            if tx.rowcount > 0:
                return False
            tx.execute("INSERT INTO alerts (id, device_id, kind, opened_at, updated_at, message, details) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, kind) WHERE closed_at IS NULL DO NOTHING",
                       (uuid.uuid4().hex, device_id, kind, ts, ts, message, details))
            return tx.rowcount > 0

    def alerts(self, *, active_only: bool = True, limit: int = 500) -> list[dict]:
        """Alerts, newest first: only the open ones unless ``active_only`` is False."""
        where = " WHERE closed_at IS NULL" if active_only else ""
        with self.db.transaction() as tx:
            rows = tx.query_dicts("SELECT id, device_id, kind, opened_at, updated_at, closed_at, message, details "
                                  f"FROM alerts{where} ORDER BY opened_at DESC, id LIMIT ?",
                                  [max(1, min(int(limit), 10_000))])
        for r in rows:
            r["details"] = _loads(r["details"], {})
            r["active"] = r["closed_at"] is None
            r["device_id"] = r["device_id"] or None
        return rows


# --------------------------------------------------------------------------- SQL pieces

_LATEST_COLS = (("device_id", _T), ("last_seen", _D), ("latest_ts", _D), ("latest_seq", _B), ("model_ts", _D),
                ("model_name", _T), ("model_version", _B), ("model_sha256", _T), ("runtime", _T),
                ("runtime_version", _T), ("delegate", _T), ("p50_ms", _D), ("p95_ms", _D), ("p99_ms", _D),
                ("inferences_per_s", _D), ("inf_count", _B), ("inf_errors", _B), ("cpu_percent", _D),
                ("temperature_c", _D), ("memory_percent", _D))

# The model a device runs, from a birth or a telemetry message, whichever the device sent last
# (a redelivered old message never replaces newer information).
_NEWER_MODEL = ", ".join(
    f"{c} = CASE WHEN devices.model_ts IS NULL OR excluded.model_ts >= devices.model_ts "
    f"THEN excluded.{c} ELSE devices.{c} END"
    for c in ("model_name", "model_version", "model_sha256", "runtime", "runtime_version", "delegate", "model_ts"))

# Figures are replaced only by newer telemetry; the model only by information newer than the
# birth's (a birth follows every model change).
_LATEST_UPSERT = (
    "ON CONFLICT (device_id) DO UPDATE SET "
    "last_seen = CASE WHEN devices.last_seen IS NULL OR excluded.last_seen > devices.last_seen "
    "THEN excluded.last_seen ELSE devices.last_seen END, "
    + ", ".join(f"{c} = CASE WHEN devices.latest_ts IS NULL OR excluded.latest_ts >= devices.latest_ts "
                f"THEN excluded.{c} ELSE devices.{c} END"
                for c in ("latest_ts", "latest_seq", "p50_ms", "p95_ms", "p99_ms", "inferences_per_s", "inf_count",
                          "inf_errors", "cpu_percent", "temperature_c", "memory_percent"))
    + ", " + _NEWER_MODEL
)

_DEVICE_SELECT = (
    "SELECT d.*, s.min_seq, s.max_seq, s.received, q.drift_ts, q.drift_score, q.drift_inputs, q.drift_outputs, "
    "q.drift_window, q.labels AS fb_labels FROM devices d LEFT JOIN device_seq s ON s.device_id = d.device_id "
    "LEFT JOIN model_quality q ON q.device_id = d.device_id AND q.model_name = d.model_name "
    "AND q.model_version = d.model_version"
)

_QUALITY_COLS = (("device_id", _T), ("model_name", _T), ("model_version", _B), ("drift_ts", _D), ("drift_score", _D),
                 ("drift_inputs", _D), ("drift_outputs", _D), ("drift_window", _B), ("feedback_ts", _D),
                 ("labels", _B), ("unmatched", _B), ("classes", _B), ("confusion_json", _T))


def _newer(ts: str, cols: tuple[str, ...]) -> str:
    cond = (f"excluded.{ts} IS NOT NULL AND (model_quality.{ts} IS NULL OR excluded.{ts} >= model_quality.{ts})")
    return ", ".join(f"{c} = CASE WHEN {cond} THEN excluded.{c} ELSE model_quality.{c} END" for c in cols)


# Drift and feedback are reported independently: each half is replaced only by a newer report of its kind.
_QUALITY_UPSERT = (
    "ON CONFLICT (device_id, model_name, model_version) DO UPDATE SET "
    + _newer("drift_ts", ("drift_score", "drift_inputs", "drift_outputs", "drift_window", "drift_ts")) + ", "
    + _newer("feedback_ts", ("labels", "unmatched", "classes", "confusion_json", "feedback_ts"))
)


def _range(col: str, device_id: str | None, since: float, until: float) -> tuple[str, list[Any]]:
    where = f"{col} >= ? AND {col} < ?"
    params: list[Any] = [float(since), float(until)]
    if device_id is not None:
        where = "device_id = ? AND " + where
        params.insert(0, device_id)
    return where, params


def _rollup_sql(db: Database, source: str, col: str, target: str, width: float, select: str) -> str:
    """INSERT ... SELECT aggregating ``source`` rows with ``col`` < ? into ``target`` buckets, merging."""
    sets = []
    for name, _, _, how in AGG:
        if how == "max":
            sets.append(f"{name} = CASE WHEN excluded.{name} IS NULL OR ({target}.{name} IS NOT NULL AND "
                        f"{target}.{name} >= excluded.{name}) THEN {target}.{name} ELSE excluded.{name} END")
        else:
            sets.append(f"{name} = CASE WHEN excluded.{name} IS NULL THEN {target}.{name} "
                        f"WHEN {target}.{name} IS NULL THEN excluded.{name} "
                        f"ELSE {target}.{name} + excluded.{name} END")
    return (f"INSERT INTO {target} (device_id, bucket, model_version, {', '.join(AGG_COLS)}) "
            f"SELECT device_id, {db.bucket_expr(col, width)}, model_version, {select} FROM {source} "
            f"WHERE {col} < ? GROUP BY 1, 2, 3 "
            f"ON CONFLICT (device_id, bucket, model_version) DO UPDATE SET {', '.join(sets)}")
