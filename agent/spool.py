"""Store-and-forward spool: telemetry and events wait here until the broker acknowledges them.

A device may be offline for days. Documents go into an SQLite database in WAL mode (one small
transaction per append, crash-safe), bounded in rows: when full the *oldest* rows are dropped
(recent state matters most) and the number dropped is persisted so the fleet can see the gap.
Each appended document gets the next value of a sequence number that is persisted with it, so
the fleet can order documents and detect loss across agent restarts.

``synchronous=FULL``: a sequence number must never be handed out twice, even across a power cut
(a receiver de-duplicating by seq would otherwise drop a new document). One fsync per append is
cheap at telemetry rates.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.errors import AgentError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    doc TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class SpoolError(AgentError):
    """The spool database cannot be opened or written."""


class Spool:
    """A bounded, persistent FIFO of ``(kind, doc)`` with per-device sequence numbers.

    Thread-safe: one connection guarded by a lock (appends from the daemon, peek/ack from the
    MQTT publisher thread).
    """

    def __init__(self, path: str | Path, max_rows: int = 10_000) -> None:
        if max_rows < 1:
            raise SpoolError(f"{path}: max_rows must be at least 1, not {max_rows}")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        try:
            self._conn = self._open()
        except (OSError, sqlite3.OperationalError) as exc:   # cannot open, read-only, locked: not corruption
            raise SpoolError(f"{self.path}: cannot open the telemetry spool: {exc}; check that the "
                             "state directory exists and is writable by the agent's user") from exc
        except sqlite3.DatabaseError as exc:        # not a database / malformed
            self._conn = self._recover(exc)

    # opening ---------------------------------------------------------------------------

    def _open(self, first_seq: int = 1) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            with _txn(conn):
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', ?)", (first_seq,))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('rows', "
                             "(SELECT COUNT(*) FROM queue))")
        except BaseException:
            conn.close()
            raise
        return conn

    def _recover(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        """A corrupt spool must not stop the agent: set it aside and start a fresh one.

        The fresh sequence starts at the current time in milliseconds, which is above any number
        the old spool can have handed out (one per append), so seq stays monotonic.
        """
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.error("%s: spool database is unreadable (%s); moved it to %s and starting an empty one",
                  self.path, exc, aside)
        try:
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return self._open(first_seq=int(time.time() * 1000))
        except (OSError, sqlite3.DatabaseError) as again:
            raise SpoolError(f"{self.path}: cannot open the telemetry spool: {again}; "
                             "check the state directory's permissions and free space") from again

    # the queue -------------------------------------------------------------------------

    def append(self, kind: str, doc: dict[str, Any]) -> int:
        """Store ``doc`` (a copy with ``seq`` set) and return its sequence number.

        Drops the oldest rows beyond ``max_rows`` and counts them.
        """
        with self._lock, _txn(self._conn):
            seq = self._meta("next_seq")
            body = json.dumps({**doc, "seq": seq}, separators=(",", ":"), sort_keys=True)
            self._conn.execute("INSERT INTO queue (seq, kind, doc, created) VALUES (?, ?, ?, ?)",
                               (seq, kind, body, time.time()))
            rows = self._meta("rows") + 1
            excess = rows - self.max_rows
            if excess > 0:
                self._conn.execute("DELETE FROM queue WHERE id IN "
                                   "(SELECT id FROM queue ORDER BY id LIMIT ?)", (excess,))
                self._conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (excess,))
                rows -= excess
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'rows'", (rows,))
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            return seq

    def peek(self, n: int = 100) -> list[tuple[int, str, dict[str, Any]]]:
        """The ``n`` oldest rows as ``(id, kind, doc)``, without removing them."""
        with self._lock:
            rows = self._conn.execute("SELECT id, kind, doc FROM queue ORDER BY id LIMIT ?", (n,)).fetchall()
        return [(row_id, kind, json.loads(doc)) for row_id, kind, doc in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete the rows the broker acknowledged; unknown ids are ignored. Returns rows deleted."""
        ids = list(ids)
        if not ids:
            return 0
        deleted = 0
        with self._lock, _txn(self._conn):
            for start in range(0, len(ids), 500):      # stay under SQLite's bound-parameter limit
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                deleted += self._conn.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk).rowcount
            self._conn.execute("UPDATE meta SET value = value - ? WHERE key = 'rows'", (deleted,))
        return deleted

    def pending(self) -> int:
        with self._lock:
            return self._meta("rows")

    def dropped(self) -> int:
        """Documents dropped (oldest first) because the spool was full, since it was created."""
        with self._lock:
            return self._meta("dropped")

    def last_seq(self) -> int:
        """The last sequence number handed out (0 if none)."""
        with self._lock:
            return self._meta("next_seq") - 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


class _txn:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK on an autocommit connection (takes the write lock early)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
