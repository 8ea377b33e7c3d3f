"""fleet.ingest against a real mosquitto (tests/support/broker.py) and the real store on SQLite and PostgreSQL.

The ingestor runs on :class:`fleet.ingest_link.IngestLink` (what the ingest processes use);
one test runs it on :class:`agent.mqtt.MqttLink` too, which other parts still hand it. Also
tests the two small additions to agent/mqtt.py that path relies on: manual acks
(``manual_ack=True`` + ``MqttLink.ack``) and inline handlers.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import paho.mqtt.client as paho
import pytest

from agent.mqtt import Message, MqttLink
from agent.protocol.messages import encode
from fleet.ingest import Ingestor, Malformed, decode, run_workers
from fleet.ingest_link import IngestLink
from fleet.store import open_store
from tests.support.agents import wait_for
from tests.support.broker import mosquitto, mosquitto_factory  # noqa: F401 (fixtures: mosquitto needs the factory)
from tests.support.postgres import TempPostgres, postgres_db  # noqa: F401 (session fixture)

FLEET = "tf"
FAST = (0.05, 0.5)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """True once ``predicate()`` is (for asserts that show their own state on failure)."""
    try:
        return bool(wait_for(predicate, timeout, "condition", interval))
    except AssertionError:
        return False


def telemetry(device: str, seq: int, p95: float = 5.0) -> bytes:
    return encode({"v": 1, "device_id": device, "seq": seq, "ts": time.time(), "data": {
        "schema": 1, "type": "telemetry", "time": time.time(), "agent": {"version": "0.1", "uptime_s": 1.0},
        "model": {"name": "digits", "version": 3, "sha256": "ab" * 32},
        "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3", "delegate": "xnnpack"},
        "inference": {"count": 10, "errors": 0, "interval_s": 10.0, "inferences_per_s": 1.0, "sampled": 10,
                      "latency_ms": {"p50": 4.0, "p95": p95, "p99": 7.0, "mean": 4.2, "max": 8.0}},
        "system": {"cpu_percent": 12.0, "temperature_c": 50.0}, "spool": {"pending": 0, "dropped": 0}}})


def event(device: str, seq: int, kind: str = "installed") -> bytes:
    return encode({"v": 1, "device_id": device, "seq": seq, "ts": time.time(), "kind": kind, "reason": "ok",
                   "command_id": "c-1", "details": {"version": 3}})


def birth(device: str) -> bytes:
    return encode({"v": 1, "state": "online", "device_id": device, "ts": time.time(), "fleet": FLEET,
                   "groups": ["lab"], "labels": {}, "profile": "x86-cpu", "agent_version": "0.1",
                   "runtime": {"name": "ai-edge-litert", "version": "2.3"}, "delegates_available": ["xnnpack"],
                   "engine": {"delegate": "xnnpack"}, "active_model": None, "hardware": {}})


def topic(device: str, channel: str) -> str:
    return f"lf/v1/{FLEET}/device/{device}/{channel}"


# ----------------------------------------------------------------------------- pure decoding

def test_decode_accepts_well_formed_messages():
    ch, dev, item = decode(topic("d1", "telemetry"), telemetry("d1", 4))
    assert (ch, dev, item[0], item[1]) == ("telemetry", "d1", "d1", 4) and item[3]["schema"] == 1
    ch, dev, item = decode(topic("d1", "events"), event("d1", 5))
    assert ch == "events" and item[1] == 5 and item[3]["kind"] == "installed"
    ch, dev, item = decode(topic("d1", "status"), birth("d1"))
    assert ch == "status" and item["state"] == "online"
    assert decode(topic("d1", "status"), b"") == ("status", "d1", None)   # a cleared retained birth


@pytest.mark.parametrize("channel,payload,why", [
    ("telemetry", b"{not json", "not valid JSON"),
    ("telemetry", b"[1, 2]", "not a JSON object"),
    ("telemetry", b'{"v": 2, "device_id": "d1", "seq": 1, "ts": 1.0, "data": {}}', "field v"),
    ("telemetry", b'{"v": true, "device_id": "d1", "seq": 1, "ts": 1.0, "data": {}}', "field v"),
    ("telemetry", b'{"v": 1, "device_id": "d2", "seq": 1, "ts": 1.0, "data": {}}', "does not match the topic"),
    ("telemetry", b'{"v": 1, "device_id": "d1", "seq": true, "ts": 1.0, "data": {}}', "field seq"),
    ("telemetry", b'{"v": 1, "device_id": "d1", "seq": -1, "ts": 1.0, "data": {}}', "field seq"),
    ("telemetry", b'{"v": 1, "device_id": "d1", "seq": "3", "ts": 1.0, "data": {}}', "field seq"),
    ("telemetry", b'{"v": 1, "device_id": "d1", "seq": 1, "ts": "now", "data": {}}', "field ts"),
    ("telemetry", b'{"v": 1, "device_id": "d1", "seq": 1, "ts": 1.0, "data": []}', "field data"),
    ("events", b'{"v": 1, "device_id": "d1", "seq": 1, "ts": 1.0, "kind": 3}', "field kind"),
    ("status", b'{"v": 1, "state": "sleeping", "device_id": "d1", "ts": 1.0}', "state"),
    ("status", b'{"v": 1, "state": "online", "device_id": "d9", "ts": 1.0}', "does not match"),
    ("telemetry", b" " * (1024 * 1024 + 1), "over the"),
])
def test_decode_rejects_malformed_messages_saying_why(channel, payload, why):
    with pytest.raises(Malformed, match=why):
        decode(topic("d1", channel), payload)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "fleet.db")
        return
    pg = request.getfixturevalue("postgres_db")
    pg.reset()
    yield pg.url


@pytest.fixture
def made():
    """Links, ingestors and stores stopped/closed at teardown."""
    things: list = []
    yield things
    for t in reversed(things):
        (t.stop if hasattr(t, "stop") else t.close)()


def start_ingest(url: str, store, made: list, client_id: str = "ingest-1", link_kind: str = "ingest_link",
                 **kwargs) -> tuple[IngestLink | MqttLink, Ingestor]:
    if link_kind == "ingest_link":
        link: IngestLink | MqttLink = IngestLink(url, client_id, backoff=FAST)
    else:
        link = MqttLink(url, client_id, manual_ack=True, backoff=FAST)
    ingestor = Ingestor(link, store, FLEET, **kwargs)
    ingestor.start()
    link.start()
    made.extend([link, ingestor])
    assert wait_until(lambda: ingestor.stats()["subscribed"]), "ingestor did not subscribe"
    return link, ingestor


def device_link(url: str, made: list, name: str = "dev-pub") -> MqttLink:
    link = MqttLink(url, name, clean_start=True, session_expiry_s=0, backoff=FAST, max_inflight=1000)
    link.start()
    made.append(link)
    assert link.wait_connected(5)
    return link


def publish_all(link: MqttLink, items: list[tuple[str, bytes]], retain: bool = False) -> None:
    tokens = [link.publish(t, p, qos=1, retain=retain) for t, p in items]
    assert all(tok.wait(10) for tok in tokens)


def stored(store, device: str) -> dict:
    return store.losses().get(device, {"received": 0, "lost": 0, "max_seq": -1})


# ----------------------------------------------------------------------------- behaviour

def test_birth_and_last_will_make_a_device_online_then_offline(mosquitto, store_url, made):
    store = open_store(store_url)
    made.append(store)
    store.migrate()
    start_ingest(mosquitto.url, store, made)
    will = encode({"v": 1, "state": "offline", "device_id": "cam-1", "ts": time.time(), "reason": "connection lost"})
    dev = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="cam-1", protocol=paho.MQTTv5)
    dev.will_set(topic("cam-1", "status"), will, qos=1, retain=True)
    dev.connect("127.0.0.1", mosquitto.port)
    dev.loop_start()
    dev.publish(topic("cam-1", "status"), birth("cam-1"), qos=1, retain=True).wait_for_publish(5)
    assert wait_until(lambda: (store.device("cam-1") or {}).get("online") is True)
    assert store.device("cam-1")["profile"] == "x86-cpu"
    dev.loop_stop()
    dev.socket().close()   # vanish without DISCONNECT: the broker publishes the will
    assert wait_until(lambda: (store.device("cam-1") or {}).get("online") is False), store.device("cam-1")


@pytest.mark.parametrize("link_kind", ["ingest_link", "paho"])
def test_telemetry_and_events_land_duplicates_ignored_gaps_and_malformed_counted(mosquitto, store_url, made,
                                                                                 link_kind):
    store = open_store(store_url)
    made.append(store)
    store.migrate()
    _link, ingestor = start_ingest(mosquitto.url, store, made, flush_ms=50, link_kind=link_kind)
    dev = device_link(mosquitto.url, made)
    items = [(topic("d1", "telemetry"), telemetry("d1", s)) for s in (0, 1, 2)]
    items += [(topic("d1", "events"), event("d1", 3))]
    items += [(topic("d1", "telemetry"), telemetry("d1", 2))]            # a redelivery
    items += [(topic("d1", "telemetry"), telemetry("d1", 5))]            # seq 4 never arrives
    items += [(topic("d1", "telemetry"), b"{garbage"),                   # malformed: dropped, counted
              (topic("d1", "telemetry"), telemetry("someone-else", 9))]
    publish_all(dev, items)
    assert wait_until(lambda: ingestor.stats()["received"] == len(items) and ingestor.stats()["pending"] == 0)
    s = ingestor.stats()
    assert s["malformed"] == 2 and s["duplicates"] == 1 and s["telemetry"] == 4 and s["events"] == 1, s
    assert stored(store, "d1") == {"received": 5, "min_seq": 0, "max_seq": 5, "lost": 1}
    assert "someone-else" not in store.losses()
    assert [e["kind"] for e in store.events(device_id="d1")] == ["installed"]
    assert store.device("d1")["p95_ms"] == 5.0
    assert s["problem"] is None and s["acked"] == len(items)


def test_ingestor_stopped_while_devices_publish_gets_everything_after_restart(mosquitto, store_url, made):
    """The server's session is persistent: what devices publish while it is down is queued by
    the broker and ingested after it comes back, and nothing is missing (zero gaps)."""
    store = open_store(store_url)
    made.append(store)
    store.migrate()
    link, ingestor = start_ingest(mosquitto.url, store, made, client_id="srv-A")
    dev = device_link(mosquitto.url, made)
    publish_all(dev, [(topic(f"d{i}", "telemetry"), telemetry(f"d{i}", 0)) for i in range(5)])
    assert wait_until(lambda: sum(v["received"] for v in store.losses().values()) == 5)
    ingestor.stop()
    link.stop()
    publish_all(dev, [(topic(f"d{i}", "telemetry"), telemetry(f"d{i}", s)) for s in range(1, 101) for i in range(5)])
    assert sum(v["received"] for v in store.losses().values()) == 5   # nobody ingested meanwhile
    _link2, ingestor2 = start_ingest(mosquitto.url, store, made, client_id="srv-A")
    assert wait_until(lambda: sum(v["received"] for v in store.losses().values()) == 505, 30), store.losses()
    assert all(v["lost"] == 0 and v["max_seq"] == 100 for v in store.losses().values())


def test_sqlite_locked_ingest_backs_off_says_why_and_catches_up(mosquitto, tmp_path, made, monkeypatch):
    import fleet.db
    monkeypatch.setattr(fleet.db, "SQLITE_BUSY_TIMEOUT_MS", 200)   # fail fast instead of waiting 10 s
    path = tmp_path / "fleet.db"
    store = open_store(str(path))
    made.append(store)
    store.migrate()
    _link, ingestor = start_ingest(mosquitto.url, store, made, flush_ms=20, backoff=(0.05, 0.3))
    dev = device_link(mosquitto.url, made)
    locker = sqlite3.connect(str(path), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        publish_all(dev, [(topic("d1", "telemetry"), telemetry("d1", s)) for s in range(50)])
        assert wait_until(lambda: ingestor.stats()["db_errors"] >= 2)
        s = ingestor.stats()
        assert s["problem"].startswith("database unavailable since") and "locked" in s["problem"], s
        assert "messages waiting" in s["problem"] and s["messages"] == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    publish_all(dev, [(topic("d1", "telemetry"), telemetry("d1", s)) for s in range(50, 60)])
    assert wait_until(lambda: stored(store, "d1")["received"] == 60, 20), stored(store, "d1")
    assert stored(store, "d1")["lost"] == 0
    assert wait_until(lambda: ingestor.stats()["problem"] is None)


def test_postgresql_unavailable_ingest_backs_off_says_why_and_catches_up(mosquitto, made):
    pg = TempPostgres.create()    # its own database: we take it away from everyone for a while
    import psycopg

    def admin(sql: str) -> None:
        with psycopg.connect(pg.admin_url, autocommit=True) as c:
            c.execute(sql)
    try:
        store = open_store(pg.url)
        store.migrate()
        _link, ingestor = start_ingest(mosquitto.url, store, made, flush_ms=20, backoff=(0.05, 0.3))
        dev = device_link(mosquitto.url, made)
        publish_all(dev, [(topic("d1", "telemetry"), telemetry("d1", 0))])
        assert wait_until(lambda: stored(store, "d1")["received"] == 1)
        admin(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS false')
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{pg.name}'")
        publish_all(dev, [(topic("d1", "telemetry"), telemetry("d1", s)) for s in range(1, 200)])
        assert wait_until(lambda: ingestor.stats()["db_errors"] >= 2, 20)
        s = ingestor.stats()
        assert s["problem"].startswith("database unavailable since"), s
        assert "messages waiting" in s["problem"] and s["pending"] > 0
        admin(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS true')
        assert wait_until(lambda: stored(store, "d1")["received"] == 200, 30), stored(store, "d1")
        assert stored(store, "d1")["lost"] == 0
        assert wait_until(lambda: ingestor.stats()["problem"] is None)
        ingestor.stop()
        store.close()
    finally:
        admin(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS true')
        pg.drop()


def test_two_ingest_processes_one_killed_mid_stream_nothing_lost(mosquitto, postgres_db, made):
    """Two worker processes share the stream into one PostgreSQL; one is SIGKILLed while
    messages flow. Its acks wait for its commits, so what it had received but not written is
    still in its broker session; the supervisor restarts it under the same client id and the
    broker delivers that (and the share it queued meanwhile): zero gaps."""
    from bench.ingest_scale import publisher_main
    from bench.support import expect, finish, spawn
    postgres_db.reset()
    store = open_store(postgres_db.url)
    made.append(store)
    store.migrate()
    pool = run_workers(2, mosquitto.url, postgres_db.url, "bench", client_id_prefix="kill-test")
    made.append(pool)
    assert wait_until(lambda: pool.stats()["subscribed"] == 2, 30), pool.stats()
    devices, rate, seconds = 200, 1500, 4.0
    proc, conn = spawn(publisher_main, "127.0.0.1", mosquitto.port, 0, devices, rate, seconds)
    try:
        expect(conn, "ready")
        conn.send(("go", time.time()))
        assert wait_until(lambda: pool.stats().get("telemetry", 0) > 1000, 30), pool.stats()
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        done = expect(conn, "done", 60)[1]
    finally:
        finish(proc, conn, 5)
    total = done["sent"]
    assert total == int(rate * seconds)
    assert wait_until(lambda: pool.restarts == 1 and pool.pids[0] != victim, 20)
    assert wait_until(lambda: sum(v["received"] for v in store.losses().values()) == total, 60), \
        (sum(v["received"] for v in store.losses().values()), total, pool.stats())
    losses = store.losses()
    assert len(losses) == devices and sum(v["lost"] for v in losses.values()) == 0


# ----------------------------------------------------------------------------- agent/mqtt.py additions

def test_manual_ack_message_is_redelivered_until_acked(mosquitto, made):
    got: list[Message] = []
    link = MqttLink(mosquitto.url, "manual-1", manual_ack=True, backoff=FAST)
    link.subscribe("m/#", got.append, inline=True)
    link.start()
    made.append(link)
    assert link.wait_connected(5)
    assert wait_until(lambda: link._workers["m/#"].subscribed.is_set())
    pub = device_link(mosquitto.url, made)
    publish_all(pub, [("m/1", b"one"), ("m/2", b"two")])
    assert wait_until(lambda: len(got) == 2)
    assert link.ack([got[0]]) == 1                        # only the first is safe
    link.stop()
    got.clear()
    link.start()                                          # same client id, resumed session
    assert wait_until(lambda: len(got) == 1, 10)
    assert got[0].payload == b"two"                        # the unacked one came back, the acked one did not
    old = Message("m/2", b"two", 1, False, {}, got[0].mid, got[0].connection - 1)
    assert link.ack([old]) == 0                            # a packet id of an earlier connection is not acked


def test_inline_handler_runs_on_the_network_thread_and_survives_errors(mosquitto, made):
    names: list[str] = []

    def handler(message: Message) -> None:
        names.append(threading.current_thread().name)
        if message.payload == b"boom":
            raise RuntimeError("bad message")

    link = MqttLink(mosquitto.url, "inline-1", clean_start=True, session_expiry_s=0, backoff=FAST)
    token = link.subscribe("i/#", handler, inline=True)
    link.start()
    made.append(link)
    assert token.wait(5)
    pub = device_link(mosquitto.url, made)
    publish_all(pub, [("i/1", b"boom"), ("i/2", b"fine")])
    assert wait_until(lambda: len(names) == 2)
    assert all(n.startswith("mqtt-net:") for n in names), names
