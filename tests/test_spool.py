"""The SQLite spool: survives restarts (new instance and new process), bounded, ack semantics."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from agent.spool import Spool, SpoolError
from tests.conftest import ROOT


def test_append_peek_ack(tmp_path):
    with Spool(tmp_path / "spool.db", max_rows=100) as s:
        seqs = [s.append("telemetry", {"n": i}) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        rows = s.peek(3)
        assert [doc["n"] for _, _, doc in rows] == [0, 1, 2]
        assert [doc["seq"] for _, _, doc in rows] == [1, 2, 3]
        assert {kind for _, kind, _ in rows} == {"telemetry"}
        # ack only the second one: the others stay, in order
        assert s.ack([rows[1][0]]) == 1
        assert [doc["n"] for _, _, doc in s.peek(10)] == [0, 2, 3, 4]
        assert s.pending() == 4
        # acking unknown or already-acked ids changes nothing
        assert s.ack([rows[1][0], 999_999]) == 0
        assert s.pending() == 4
        assert s.ack([]) == 0


def test_the_callers_doc_is_not_modified(tmp_path):
    with Spool(tmp_path / "spool.db") as s:
        doc = {"a": 1}
        s.append("event", doc)
        assert doc == {"a": 1}


def test_survives_a_new_instance_and_seq_continues(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path, max_rows=3)
    for i in range(5):                 # two dropped
        s.append("telemetry", {"n": i})
    s.close()
    s2 = Spool(path, max_rows=3)
    assert s2.pending() == 3
    assert s2.dropped() == 2
    assert [doc["n"] for _, _, doc in s2.peek(10)] == [2, 3, 4]
    assert s2.append("event", {"n": 5}) == 6
    assert s2.last_seq() == 6
    s2.close()


def test_survives_a_killed_process(tmp_path):
    """A writer process killed without closing the database: everything it committed is there."""
    path = tmp_path / "spool.db"
    code = (
        "import os, sys\n"
        "from agent.spool import Spool\n"
        "s = Spool(sys.argv[1], max_rows=50)\n"
        "for i in range(60): s.append('telemetry', {'n': i})\n"
        "os._exit(0)\n"            # no close(), no atexit: like a crash after the last commit
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, timeout=120)
    assert proc.returncode == 0
    with Spool(path, max_rows=50) as s:
        assert s.pending() == 50 and s.dropped() == 10
        assert s.peek(1)[0][2] == {"n": 10, "seq": 11}
        assert s.append("telemetry", {"n": 60}) == 61


def test_bound_drops_oldest_and_counts(tmp_path):
    with Spool(tmp_path / "spool.db", max_rows=10) as s:
        for i in range(25):
            s.append("telemetry", {"n": i})
        assert s.pending() == 10
        assert s.dropped() == 15
        assert [doc["n"] for _, _, doc in s.peek(100)] == list(range(15, 25))
        # acks make room: no more drops until full again
        s.ack([row_id for row_id, _, _ in s.peek(5)])
        for i in range(5):
            s.append("telemetry", {"n": 100 + i})
        assert s.dropped() == 15 and s.pending() == 10


def test_two_threads_append_and_ack(tmp_path):
    s = Spool(tmp_path / "spool.db", max_rows=100_000)
    n = 300
    acked: list[int] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(n):
            s.append("telemetry", {"n": i})
        done.set()

    def publisher() -> None:
        while not (done.is_set() and s.pending() == 0):
            rows = s.peek(50)
            acked.extend(doc["seq"] for _, _, doc in rows)
            s.ack([row_id for row_id, _, _ in rows])

    threads = [threading.Thread(target=writer), threading.Thread(target=publisher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(acked) == acked == list(range(1, n + 1))   # every doc once, in order
    s.close()


def test_corrupt_file_is_set_aside_and_seq_stays_monotonic(tmp_path, caplog):
    path = tmp_path / "spool.db"
    with Spool(path) as s:
        last = s.append("telemetry", {})
    path.write_bytes(b"this is not an sqlite database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"spool.db{suffix}").unlink(missing_ok=True)
    with Spool(path) as s:
        assert s.pending() == 0
        assert s.append("telemetry", {}) > last
    assert list(tmp_path.glob("spool.db.corrupt-*"))
    assert "moved it to" in caplog.text


def test_unopenable_path_is_a_clear_error(tmp_path):
    (tmp_path / "spool.db").mkdir()            # a directory where the database should be
    with pytest.raises(SpoolError, match="spool.db: cannot open the telemetry spool"):
        Spool(tmp_path / "spool.db")
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="writable"):
        Spool(tmp_path / "file" / "spool.db")  # parent is a file


def test_max_rows_must_be_positive(tmp_path):
    with pytest.raises(SpoolError, match="max_rows"):
        Spool(tmp_path / "spool.db", max_rows=0)
