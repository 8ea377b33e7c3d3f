"""A tiny DB-API adapter so the store writes each query once for SQLite and PostgreSQL.

Why not an ORM: the store's hot path (``write_batch``) is a handful of multi-row INSERTs that
must run 10k rows/s on 2 cores; the adapter only rewrites placeholders (queries use ``?``;
psycopg wants ``%s``), pools connections and keeps every dialect difference in one of the
small functions at the bottom (``bucket_expr``, ``lock_for``, ``snapshot``).

Connections come from a small pool, one per caller at a time: the HTTP API's threads, the
ingest thread and the rollup timer each borrow one for one transaction. SQLite connections are
opened in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so readers never block the
writer and two writers wait for each other instead of failing.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.protocol.errors import LitefleetError

SQLITE_BUSY_TIMEOUT_MS = 10_000
POOL_IDLE_MAX = 8          # idle connections kept; more are closed when returned
INSERT_CHUNK_SQLITE = 500  # rows per multi-row VALUES (x 14 columns: far below SQLite's 32766 variables)
_COPY_TYPES = {"text": "text", "bigint": "int8", "double precision": "float8"}


class StoreError(LitefleetError):
    """The fleet store refused a request (bad URL, schema newer than this code, bad argument)."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or is busy now; retrying later may succeed."""


def parse_url(url: str) -> tuple[str, str]:
    """``(backend, target)``: ``("sqlite", "/abs/path.db")`` or ``("postgresql", url)``.

    Accepts ``sqlite:///abs/path.db``, ``sqlite:///relative.db`` (three slashes and a relative
    path), a plain file path, ``postgresql://...`` and ``postgres://...``.
    """
    if not url or not isinstance(url, str):
        raise StoreError("no database given: pass a file path, sqlite:///path.db or postgresql://...")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    if scheme == "sqlite":
        path = unquote(urlsplit(url).path)
        if not path or path == "/":
            raise StoreError(f"{url}: no database file in the URL (use sqlite:////abs/path.db or a plain path)")
        # sqlite:///abs.db gives "/abs.db"; sqlite:////abs.db gives "//abs.db": both mean an absolute path.
        if path.startswith("//"):
            path = path[1:]
        return "sqlite", path
    if scheme:
        raise StoreError(f"{url}: unsupported database scheme {scheme!r} (use a file path, sqlite:/// or postgresql://)")
    return "sqlite", url


class Database:
    """A pool of connections to one database plus the placeholder rewriting."""

    def __init__(self, url: str) -> None:
        self.backend, self.target = parse_url(url)
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._sql_cache: dict[Any, str] = {}
        self._stage_names: dict[tuple, str] = {}
        self._staged: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        if self.backend == "sqlite":
            Path(self.target).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            self._errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        else:
            try:
                import psycopg
            except ImportError:
                raise StoreError("PostgreSQL support needs psycopg 3: pip install 'litefleet[host]' "
                                 "(or pip install 'psycopg[binary]>=3.1')") from None
            self._psycopg = psycopg
            self._errors = (psycopg.Error,)
            self._unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        # Open one connection now so a wrong URL or a down server is reported at start.
        self._release(self._connect())

    # connections ------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            if self.backend == "sqlite":
                conn = sqlite3.connect(self.target, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                return conn
            return self._psycopg.connect(self.target, autocommit=False, connect_timeout=10)
        except self._errors as exc:
            raise StoreUnavailableError(f"cannot open the {self.backend} database {self.describe()}: "
                                        f"{str(exc).strip()}") from exc

    def _release(self, conn: Any) -> None:
        broken = self.backend == "postgresql" and (conn.closed or conn.broken)
        if self._closed or broken or self._idle.qsize() >= POOL_IDLE_MAX:
            with contextlib.suppress(Exception):
                conn.close()
            return
        self._idle.put(conn)

    def describe(self) -> str:
        """The database's address without a password, for messages."""
        if self.backend == "sqlite":
            return self.target
        parts = urlsplit(self.target)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"postgresql://{user}{host}{port}{parts.path}"

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False, snapshot: bool = False) -> Iterator["Tx"]:
        """One transaction on a pooled connection; commit on success, roll back on an exception.

        ``write`` takes SQLite's write lock at BEGIN (so a read-then-write transaction never
        fails half way with "database is locked"); ``snapshot`` gives every statement of a
        PostgreSQL transaction the same snapshot (REPEATABLE READ), as SQLite always does.
        Connection failures become :class:`StoreUnavailableError`.
        """
        if self._closed:
            raise StoreError("the store is closed")
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        ok = False
        try:
            try:
                if self.backend == "sqlite":
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                elif snapshot:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                tx = Tx(self, conn)
                yield tx
                conn.commit() if self.backend == "postgresql" else conn.execute("COMMIT")
                ok = True
            except self._errors as exc:
                raise self._translate(exc) from exc
        finally:
            if not ok:
                if self.backend == "postgresql":
                    self._staged.pop(conn, None)    # a CREATE TEMP TABLE of this transaction is undone too
                with contextlib.suppress(Exception):
                    conn.rollback() if self.backend == "postgresql" else conn.execute("ROLLBACK")
            self._release(conn)

    def _translate(self, exc: BaseException) -> StoreError:
        """A driver error as ours: unavailable (retry may help: connection, lock, busy) or not."""
        message = f"{self.backend} database {self.describe()}: {str(exc).strip()}"
        if self.backend == "sqlite":
            text = str(exc).lower()
            transient = isinstance(exc, sqlite3.OperationalError) and any(
                w in text for w in ("locked", "busy", "unable to open", "disk i/o", "database or disk is full"))
        else:
            transient = isinstance(exc, self._unavailable)
            if transient:   # the server went away or restarted: the idle connections are dead too
                self._drain()
        return StoreUnavailableError(message) if transient else StoreError(message)

    def _drain(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()

    def sql(self, query: str) -> str:
        """``query`` with ``?`` placeholders rewritten for this backend (cached)."""
        if self.backend == "sqlite":
            return query
        out = self._sql_cache.get(query)
        if out is None:
            out = query.replace("%", "%%").replace("?", "%s")
            self._sql_cache[query] = out
        return out

    def close(self) -> None:
        self._closed = True
        self._drain()

    # dialect ------------------------------------------------------------------------------

    def bucket_expr(self, column: str, width_s: float) -> str:
        """SQL for the start of ``column``'s bucket of ``width_s`` seconds (epoch-aligned).

        SQLite's CAST truncates (fine for positive epochs) and may lack FLOOR; PostgreSQL's
        CAST rounds, so it needs FLOOR.
        """
        w = repr(float(width_s))
        if self.backend == "sqlite":
            return f"(CAST({column} / {w} AS INTEGER) * {w})"
        return f"(FLOOR({column} / {w}) * {w})"

    def insert_rows(self, tx: "Tx", table: str, cols: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]],
                    *, tail: str = "", returning: bool = False) -> list[tuple[Any, ...]]:
        """INSERT many rows in few statements; the rows of ``tail``'s RETURNING when ``returning``.

        ``cols``: (name, SQL type) pairs, the type one of ``text``, ``bigint``, ``double
        precision``. SQLite: multi-row VALUES in chunks. PostgreSQL: binary COPY into a
        temporary staging table, then one ``INSERT ... SELECT`` (psycopg re-parses a long VALUES
        statement on every call and adapts arrays in Python: both cost more than the database).
        """
        out: list[tuple[Any, ...]] = []
        if not rows:
            return out
        names = ",".join(c[0] for c in cols)
        if self.backend == "postgresql":
            stage = self._stage(tx, cols)
            with tx.cur.copy(f"COPY {stage} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([_COPY_TYPES[c[1]] for c in cols])
                for row in rows:
                    copy.write_row(row)
            tx.cur.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} {tail}")
            if returning:
                out = tx.cur.fetchall()
            tx.cur.execute(f"TRUNCATE {stage}")
            return out
        for start in range(0, len(rows), INSERT_CHUNK_SQLITE):
            chunk = rows[start:start + INSERT_CHUNK_SQLITE]
            key = (table, names, tail, len(chunk))
            sql = self._sql_cache.get(key)
            if sql is None:
                one = "(" + ",".join("?" * len(cols)) + ")"
                sql = f"INSERT INTO {table} ({names}) VALUES {','.join([one] * len(chunk))} {tail}"
                self._sql_cache[key] = sql
            tx.cur.execute(sql, [v for row in chunk for v in row])
            if returning:
                out.extend(tx.cur.fetchall())
        return out

    def _stage(self, tx: "Tx", cols: Sequence[tuple[str, str]]) -> str:
        """The name of this connection's temporary table with ``cols`` (created on first use)."""
        key = tuple(cols)
        name = self._stage_names.get(key)
        if name is None:
            with self._lock:
                name = self._stage_names.setdefault(key, f"lf_stage_{len(self._stage_names)}")
        made = self._staged.get(tx.conn)
        if made is None:
            made = self._staged[tx.conn] = set()
        if name not in made:
            spec = ", ".join(f"{c} {t}" for c, t in cols)
            tx.cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({spec})")
            made.add(name)
        return name

    def lock_for(self, tx: "Tx", name: str) -> None:
        """Serialise one kind of job (migrations, rollups) across processes sharing the database.

        SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL needs an advisory lock,
        held until the transaction ends.
        """
        if self.backend == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key(name),))


    def try_lock_for(self, tx: "Tx", name: str) -> bool:
        """Like :meth:`lock_for` but gives up at once: False when another process holds it."""
        if self.backend == "postgresql":
            return bool(tx.query("SELECT pg_try_advisory_xact_lock(?)", (_lock_key(name),))[0][0])
        return True


def _lock_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "big", signed=True)


class Tx:
    """A cursor-like handle valid for one transaction; queries use ``?`` placeholders."""

    def __init__(self, db: Database, conn: Any) -> None:
        self.db = db
        self.conn = conn
        self.cur = conn.cursor()

    def execute(self, query: str, params: Sequence[Any] = ()) -> "Tx":
        self.cur.execute(self.db.sql(query), params)
        return self

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cur.executemany(self.db.sql(query), rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.cur.fetchall()

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.cur.fetchone()

    def query(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.cur.execute(self.db.sql(query), params)
        return self.cur.fetchall()

    def query_dicts(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.cur.execute(self.db.sql(query), params)
        names = [d[0] for d in self.cur.description]
        return [dict(zip(names, row)) for row in self.cur.fetchall()]

    @property
    def rowcount(self) -> int:
        return self.cur.rowcount

    def script(self, text: str) -> None:
        """Run ``;``-separated statements (a migration file) inside this transaction."""
        for statement in split_statements(text):
            self.cur.execute(statement)


def split_statements(text: str) -> list[str]:
    """Statements of a migration file: ``--`` comments dropped, split on ``;`` at line ends.

    Migration files keep every ``;`` at the end of a line and none inside string literals.
    """
    lines = [line.split("--", 1)[0].rstrip() for line in text.splitlines()]
    out, current = [], []
    for line in lines:
        if not line.strip():
            continue
        current.append(line)
        if line.endswith(";"):
            statement = "\n".join(current).rstrip(";").strip()
            if statement:
                out.append(statement)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        out.append(tail)
    return out
