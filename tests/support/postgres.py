"""A throwaway PostgreSQL database per test session, on the server running on this machine.

The server (127.0.0.1:5432, trust auth, user ``postgres``) is shared: each session creates its
own database ``lf_test_<pid>_<random>`` through the maintenance database ``test`` and drops it
at the end; no other database is ever touched. ``LITEFLEET_TEST_PG`` overrides the server's
address (a ``postgresql://`` URL of the maintenance database).

Usage::

    from tests.support.postgres import TempPostgres
    pg = TempPostgres.create()      # pg.url is postgresql://.../lf_test_...
    pg.reset()                      # drop every table (a fresh schema for the next test)
    pg.drop()
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

ADMIN_URL = os.environ.get("LITEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server cannot be reached; the message says where we looked."""


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@dataclass
class TempPostgres:
    name: str
    url: str
    admin_url: str = ADMIN_URL

    @classmethod
    def create(cls, admin_url: str = ADMIN_URL) -> "TempPostgres":
        import psycopg
        name = f"lf_test_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError as exc:
            raise PostgresUnavailable(f"cannot create a test database on {admin_url}: {exc}") from exc
        return cls(name, _with_db(admin_url, name), admin_url)

    def reset(self) -> None:
        """Drop and recreate the public schema: the next test starts from an empty database."""
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")

    def drop(self) -> None:
        import psycopg
        assert self.name.startswith("lf_test_")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is always there in tests
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def postgres_db():
        """A :class:`TempPostgres` for the whole session, dropped at its end.

        Import it into a test module (``from tests.support.postgres import postgres_db``);
        call ``postgres_db.reset()`` for an empty schema between tests.
        """
        db = TempPostgres.create()
        try:
            yield db
        finally:
            db.drop()
