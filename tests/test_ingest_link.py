"""fleet/ingest_link.py: the packet parser (agent/mqtt_wire.py) on hand-made bytes, then the link against a real mosquitto
(persistent session, redelivery after a kill, stale packet ids, DISCONNECT, mutual TLS with the
project's generated configuration) and, for what no real broker would ever send (a malformed
packet), a small fake server that speaks just enough MQTT to send it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.mqtt import MqttLink, TlsFiles
from agent.protocol.messages import encode
from fleet.ingest import Ingestor
from agent.mqtt_wire import PacketReader, ProtocolError, connect_packet, puback_packets, reason_text, subscribe_packet
from fleet.ingest_link import IngestLink
from fleet.store import open_store
from tests.support.agents import wait_for
from tests.support.broker import mosquitto, mosquitto_factory  # noqa: F401 (fixtures: mosquitto needs the factory)

ROOT = Path(__file__).resolve().parents[1]
FAST = (0.05, 0.3)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, qos: int = 1, packet_id: int = 1, props: bytes = b"", dup: bool = False) -> bytes:
    """A PUBLISH packet as an MQTT 5 broker sends it."""
    raw = topic.encode()
    body = struct.pack(">H", len(raw)) + raw + (struct.pack(">H", packet_id) if qos else b"")
    body += varint(len(props)) + props + payload
    return bytes([0x30 | (0x08 if dup else 0) | (qos << 1)]) + varint(len(body)) + body


# ----------------------------------------------------------------------------- pure parsing

def test_one_qos1_publish_gives_topic_payload_and_a_token_of_this_connection():
    pubs, controls = PacketReader().feed(publish("a/b", b"hello", packet_id=513), connection=3)
    assert pubs == [("a/b", b"hello", 3 << 16 | 513)] and controls == []


def test_qos0_publish_has_token_zero_nothing_to_ack():
    pubs, _ = PacketReader().feed(publish("a/b", b"x", qos=0), connection=1)
    assert pubs == [("a/b", b"x", 0)]


def test_properties_are_skipped_by_their_length():
    # payload format indicator, message expiry, a user property and a 200-byte correlation data
    # (so the properties length takes two bytes)
    props = b"\x01\x01" + b"\x02" + struct.pack(">I", 60) + b"\x26\x00\x01k\x00\x01v" + b"\x09\x00\xc8" + b"c" * 200
    assert len(props) > 127
    pubs, _ = PacketReader().feed(publish("t", b'{"v":1}', props=props, packet_id=9), connection=1)
    assert pubs == [("t", b'{"v":1}', 1 << 16 | 9)]


def test_many_packets_in_one_read_keep_their_order_with_control_packets_apart():
    data = (publish("a", b"1", packet_id=1) + b"\x90\x04\x00\x07\x00\x01" + publish("b", b"2", qos=0)
            + b"\xd0\x00" + publish("c", b"3", packet_id=2))
    pubs, controls = PacketReader().feed(data, connection=1)
    assert [(t, p) for t, p, _ in pubs] == [("a", b"1"), ("b", b"2"), ("c", b"3")]
    assert controls == [(0x90, b"\x00\x07\x00\x01"), (0xD0, b"")]


@pytest.mark.parametrize("size", [10, 200, 20_000, 3_000_000])   # 1-, 2-, 3- and 4-byte remaining lengths
def test_packets_split_at_every_kind_of_boundary_come_out_whole(size):
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    stream = publish("lf/v1/f/device/d/telemetry", payload, packet_id=7) + publish("x", b"tail", packet_id=8)
    reader = PacketReader()
    got = []
    cuts = sorted({1, 2, 3, 4, 5, 31, 32, len(stream) // 2, len(stream) - 5, len(stream) - 1})
    start = 0
    for cut in cuts + [len(stream)]:
        pubs, _ = reader.feed(stream[start:cut], connection=1)
        got += pubs
        start = cut
    assert [(t, len(p)) for t, p, _ in got] == [("lf/v1/f/device/d/telemetry", size), ("x", 4)]
    assert got[0][1] == payload and reader.buffered == 0


def test_byte_by_byte_feeding_gives_each_packet_exactly_once():
    stream = b"".join(publish(f"t/{i}", b"p" * i, packet_id=i + 1) for i in range(20))
    reader = PacketReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i:i + 1], connection=2)[0]
    assert [t for t, _, _ in got] == [f"t/{i}" for i in range(20)]
    assert [tok & 0xFFFF for _, _, tok in got] == list(range(1, 21))


@pytest.mark.parametrize("data,why", [
    (b"\x30\xff\xff\xff\xff\x01", "remaining length: more than 4 bytes"),
    (b"\x32\x05\x00\x09abc", "topic length 9"),
    (b"\x32\x03\x00\x00\x00", "topic length 0"),
    (b"\x34\x06\x00\x01t\x00\x01\x00", "QoS 2"),
    (b"\x36\x06\x00\x01t\x00\x01\x00", "QoS 3"),
    (b"\x32\x06\x00\x01t\x00\x01\x09", "9-byte properties"),
    (b"\x32\x05\x00\x01t\x00\x01", "no properties length"),
    (b"\x32\x03\x00\x01t", "no room for the packet id"),
    (b"\x32\x06\x00\x01t\x00\x00\x00", "packet id 0"),
    (b"\x32\x04\x00\x01t\x00", "no room for the packet id"),
    (b"\x30\x04\x00\x02\xff\xfe", "not UTF-8"),
])
def test_malformed_packets_raise_an_error_naming_what_was_wrong(data, why):
    with pytest.raises(ProtocolError, match=why):
        PacketReader().feed(data, connection=1)


def test_corrupted_streams_raise_protocol_error_or_parse_never_anything_else():
    import random
    rng = random.Random(6)
    good = b"".join(publish(f"lf/v1/f/device/d{i}/telemetry", b"x" * rng.randrange(300), qos=i % 2,
                            packet_id=i + 1, props=b"\x01\x01" * (i % 3)) for i in range(30))
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        reader = PacketReader()
        try:
            for start in range(0, len(data), 97):
                reader.feed(bytes(data[start:start + 97]), connection=1)
        except ProtocolError:
            pass


def test_encoders_write_the_packets_the_spec_describes():
    assert puback_packets([1, 0x1234]) == b"\x40\x02\x00\x01\x40\x02\x12\x34"
    sub = subscribe_packet(5, ["$share/g/a/+/b", "c"], 1)
    assert sub == b"\x82" + varint(len(sub) - 2) + b"\x00\x05\x00" + b"\x00\x0e$share/g/a/+/b\x01\x00\x01c\x01"
    con = connect_packet("cid", clean_start=False, keepalive_s=30, session_expiry_s=3600, receive_maximum=1000,
                         username="u", password="p")
    _, controls = PacketReader().feed(con, connection=1)
    first, body = controls[0]
    assert first == 0x10 and body[:7] == b"\x00\x04MQTT\x05" and body[7] == 0xC0   # user+password, no clean start
    assert body[8:10] == struct.pack(">H", 30)
    assert body[10:19] == b"\x08\x11" + struct.pack(">I", 3600) + b"\x21" + struct.pack(">H", 1000)
    assert body[19:] == b"\x00\x03cid\x00\x01u\x00\x01p"
    assert reason_text(0x87) == "0x87 (not authorized)"


# ----------------------------------------------------------------------------- a misbehaving server

class FakeBroker:
    """A TCP server speaking just enough MQTT 5 to misbehave on purpose (a real broker never
    sends a malformed packet). Connection ``n`` gets CONNACK, SUBACK, then ``scripts[n]``."""

    def __init__(self, scripts: list[bytes]) -> None:
        self.scripts = scripts
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[list[tuple[int, bytes]]] = []     # per connection: the client's packets
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._conns.append(conn)
            index = len(self.received)
            self.received.append([])
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        reader = PacketReader()
        script = self.scripts[min(index, len(self.scripts) - 1)]
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for first, body in reader.feed(data, 0)[1]:
                self.received[index].append((first, body))
                if first == 0x10:
                    conn.sendall(b"\x20\x03\x00\x00\x00")
                elif first == 0x82:
                    conn.sendall(b"\x90\x04" + body[:2] + b"\x00\x01")
                    conn.sendall(script)

    def close(self) -> None:
        self.server.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def made():
    """Links, ingestors, stores and fake brokers stopped/closed at teardown."""
    things: list = []
    yield things
    for t in reversed(things):
        (t.stop if hasattr(t, "stop") else t.close)()


def test_a_malformed_length_drops_the_connection_with_a_clear_error_and_it_reconnects(made, caplog):
    fake = FakeBroker([publish("a", b"1", packet_id=1) + b"\x30\xff\xff\xff\xff\x01",
                       publish("a", b"1", packet_id=3, dup=True) + publish("b", b"2", packet_id=4)])
    made.append(fake)
    got: list = []
    link = IngestLink(fake.url, "fake-1", backoff=FAST)
    link.subscribe_batches(["a", "b"], got.extend)
    link.start()
    made.append(link)
    wait_for(lambda: len(fake.received) == 2 and link.connection == 2, 10, "a second connection")
    assert any("malformed packet (type 3) remaining length: more than 4 bytes" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    wait_for(lambda: any(t == "b" for t, _, _ in got), 10, "the redelivered and the new message")
    # what the broken read held is never handed over (so never acked); the broker sends it again
    assert [(t, p, tok >> 16) for t, p, tok in got if tok >> 16 == 2] == [("a", b"1", 2), ("b", b"2", 2)]
    assert link.ack([t for _, _, t in got] + [1 << 16 | 1]) == 2    # an id of connection 1 is not acked
    wait_for(lambda: sum(1 for f, _ in fake.received[1] if f == 0x40) == 2, 5, "two PUBACKs")
    assert [b for f, b in fake.received[1] if f == 0x40] == [b"\x00\x03", b"\x00\x04"]
    assert not [b for f, b in fake.received[0] if f == 0x40]


def test_keepalive_pings_an_idle_broker(made):
    fake = FakeBroker([b""])
    made.append(fake)
    link = IngestLink(fake.url, "fake-2", keepalive_s=1, backoff=FAST)
    link.subscribe_batches(["a"], lambda batch: None)
    link.start()
    made.append(link)
    wait_for(lambda: fake.received and any(f == 0xC0 for f, _ in fake.received[0]), 5, "a PINGREQ")
    assert link.connection == 1


def test_connect_refused_by_the_broker_says_why(made):
    server = socket.create_server(("127.0.0.1", 0))
    made.append(server)

    def refuse() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"\x20\x03\x00\x87\x00")                 # CONNACK: not authorized

    threading.Thread(target=refuse, daemon=True).start()
    link = IngestLink(f"mqtt://127.0.0.1:{server.getsockname()[1]}", "refused", backoff=(5.0, 5.0))
    link.subscribe_batches(["a"], lambda batch: None)
    link.start()
    made.append(link)
    wait_for(lambda: link.last_error and "0x87 (not authorized)" in link.last_error, 5, "the refusal")
    assert not link.connected


def test_an_mqtt311_only_broker_is_named_as_such(made):
    server = socket.create_server(("127.0.0.1", 0))
    made.append(server)

    def refuse() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"\x20\x02\x00\x01")                     # 3.1.1 CONNACK: unacceptable protocol version

    threading.Thread(target=refuse, daemon=True).start()
    link = IngestLink(f"mqtt://127.0.0.1:{server.getsockname()[1]}", "old-broker", backoff=(5.0, 5.0))
    link.subscribe_batches(["a"], lambda batch: None)
    link.start()
    made.append(link)
    wait_for(lambda: link.last_error and "needs an MQTT 5 broker" in link.last_error, 5, "the refusal")
    assert not link.connected


def test_disconnect_from_the_server_is_reported_and_the_link_comes_back(made, caplog):
    """mosquitto 2.0.11 closes the socket without a DISCONNECT (session takeover, shutdown), so
    the fake server sends one: reason 0x8B, then serves the next connection normally."""
    fake = FakeBroker([b"\xe0\x01\x8b", publish("a", b"after", packet_id=1)])
    made.append(fake)
    got: list = []
    link = IngestLink(fake.url, "fake-3", backoff=FAST)
    link.subscribe_batches(["a"], got.extend)
    link.start()
    made.append(link)
    wait_for(lambda: got, 10, "a message on the next connection")
    assert any("broker sent DISCONNECT: 0x8B (server shutting down)" in r.getMessage() for r in caplog.records)
    assert got == [("a", b"after", 2 << 16 | 1)]


# ----------------------------------------------------------------------------- a real broker

def device_link(url: str, made: list, name: str = "dev-pub") -> MqttLink:
    link = MqttLink(url, name, clean_start=True, session_expiry_s=0, backoff=FAST, max_inflight=1000)
    link.start()
    made.append(link)
    assert link.wait_connected(5)
    return link


def publish_all(link: MqttLink, items: list[tuple[str, bytes]]) -> None:
    tokens = [link.publish(t, p, qos=1) for t, p in items]
    assert all(tok.wait(10) for tok in tokens)


def collecting_link(url: str, client_id: str, made: list, filters=("k/#",)) -> tuple[IngestLink, list]:
    got: list = []
    link = IngestLink(url, client_id, backoff=FAST)
    token = link.subscribe_batches(list(filters), got.extend)
    link.start()
    made.append(link)
    wait_for(lambda: token.wait(0), 10, f"{client_id} subscribed")
    return link, got


_VICTIM = """
import sys, threading
from fleet.ingest_link import IngestLink
url, cid, out = sys.argv[1:4]
count = [0]
def on_batch(batch):
    count[0] += len(batch)
    with open(out, "w") as f:
        f.write(str(count[0]))
link = IngestLink(url, cid, backoff=(0.05, 0.3))
token = link.subscribe_batches(["k/#"], on_batch)
link.start()
token.wait(10)
open(out + ".ready", "w").close()
threading.Event().wait()   # until SIGKILL
"""


def test_a_killed_process_unacked_messages_come_back_to_its_session(mosquitto, made, tmp_path):
    """The process receives 20 messages and is SIGKILLed before acknowledging them; the same
    client id reconnecting gets all 20 again; once acknowledged, they never come back."""
    out = tmp_path / "count"
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, mosquitto.url, "victim", str(out)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: Path(str(out) + ".ready").exists(), 20, "the victim subscribed")
        dev = device_link(mosquitto.url, made)
        publish_all(dev, [(f"k/{i}", str(i).encode()) for i in range(20)])
        wait_for(lambda: out.exists() and out.read_text() == "20", 10, "the victim received 20")
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    link, got = collecting_link(mosquitto.url, "victim", made)
    wait_for(lambda: len(got) == 20, 10, "20 redelivered messages")
    assert sorted(int(p) for _, p, _ in got) == list(range(20))
    assert link.ack([t for _, _, t in got]) == 20
    link.stop()
    got.clear()
    publish_all(dev, [("k/probe", b"probe")])           # arrives after anything still queued
    link.start()
    wait_for(lambda: any(t == "k/probe" for t, _, _ in got), 10, "the probe")
    assert [t for t, _, _ in got] == ["k/probe"]


def test_ids_of_an_earlier_connection_are_not_acked_on_the_new_one(mosquitto, made):
    link, got = collecting_link(mosquitto.url, "stale-1", made)
    dev = device_link(mosquitto.url, made)
    publish_all(dev, [(f"k/{i}", str(i).encode()) for i in range(10)])
    wait_for(lambda: len(got) == 10, 10, "10 messages")
    old = [t for _, _, t in got]
    got.clear()
    mosquitto.restart()                                   # the session and its 10 unacked messages persist
    wait_for(lambda: link.connection == 2 and len(got) == 10, 20, "10 messages again on connection 2")
    assert link.ack(old) == 0                            # ids of connection 1: meaningless now
    assert link.ack([t for _, _, t in got]) == 10
    link.stop()
    got.clear()
    dev2 = device_link(mosquitto.url, made, "dev-pub-2")
    publish_all(dev2, [("k/probe", b"probe")])
    link.start()
    wait_for(lambda: any(t == "k/probe" for t, _, _ in got), 10, "the probe")
    assert [t for t, _, _ in got] == ["k/probe"]


def test_ingestor_on_the_link_stores_acks_and_counts_malformed(mosquitto, made, tmp_path):
    store = open_store(str(tmp_path / "fleet.db"))
    made.append(store)
    store.migrate()
    link = IngestLink(mosquitto.url, "ingest-x", backoff=FAST)
    ingestor = Ingestor(link, store, "tf", flush_ms=20)
    ingestor.start()
    link.start()
    made.extend([link, ingestor])
    wait_for(lambda: ingestor.stats()["subscribed"], 10, "subscribed")
    dev = device_link(mosquitto.url, made)
    good = [("lf/v1/tf/device/d1/telemetry", encode({"v": 1, "device_id": "d1", "seq": s, "ts": 1.0, "data": {}}))
            for s in range(50)]
    publish_all(dev, good + [("lf/v1/tf/device/d1/telemetry", b"{nope")])
    wait_for(lambda: ingestor.stats()["acked"] == 51, 10, "51 acks")
    s = ingestor.stats()
    assert s["telemetry"] == 50 and s["malformed"] == 1 and s["pending"] == 0 and s["connected"], s
    assert store.losses()["d1"]["received"] == 50 and s["problem"] is None


def test_mutual_tls_with_the_generated_broker_configuration(made, tmp_path):
    """mqtts:// with the server identity `litefleet broker config` issues, through the
    generated ACL; a client that does not trust the broker's CA is refused with the TLS error."""
    from fleet import broker as broker_mod
    from fleet.broker import BrokerSettings, parse_device_spec
    from tests.support.broker import free_port
    from tests.test_broker_acl import RUN_AS, GeneratedMosquitto
    settings = BrokerSettings("tf", port=free_port(), run_as=RUN_AS)
    layout = broker_mod.generate(tmp_path / "broker", settings, [parse_device_spec("d1:lab@x86-cpu")]).layout
    mosq = GeneratedMosquitto(layout, settings).start()
    made.append(mosq)
    url = f"mqtts://127.0.0.1:{mosq.port}"

    def tls(identity: str, ca: Path = layout.ca_cert) -> TlsFiles:
        return TlsFiles(str(ca), str(layout.client_cert(identity)), str(layout.client_key(identity)))

    store = open_store(str(tmp_path / "fleet.db"))
    made.append(store)
    store.migrate()
    link = IngestLink(url, "litefleet-server-ingest", tls=tls("litefleet-server"), backoff=FAST)
    ingestor = Ingestor(link, store, "tf", flush_ms=20)
    ingestor.start()
    link.start()
    made.extend([link, ingestor])
    wait_for(lambda: ingestor.stats()["subscribed"], 10, "the server identity subscribed")
    dev = MqttLink(url, "d1", tls=tls("d1"), clean_start=True, session_expiry_s=0, backoff=FAST)
    dev.start()
    made.append(dev)
    assert dev.wait_connected(10)
    publish_all(dev, [("lf/v1/tf/device/d1/telemetry",
                       encode({"v": 1, "device_id": "d1", "seq": s, "ts": 1.0, "data": {}})) for s in range(5)])
    wait_for(lambda: (store.losses().get("d1") or {}).get("received") == 5, 10, "5 stored over TLS")

    other_ca = tmp_path / "other"
    broker_mod.generate(other_ca, BrokerSettings("tf", port=free_port(), run_as=RUN_AS), [])
    wrong = IngestLink(url, "wrong-ca", tls=tls("litefleet-server", other_ca / "ca.crt"), backoff=(5.0, 5.0))
    wrong.subscribe_batches(["lf/v1/tf/device/+/telemetry"], lambda batch: None)
    wrong.start()
    made.append(wrong)
    wait_for(lambda: wrong.last_error and "CERTIFICATE_VERIFY_FAILED" in wrong.last_error, 10, "the TLS error")
    assert not wrong.connected


def test_fleet_server_ingests_through_the_link_and_reports_its_stats(mosquitto, made, tmp_path, trusted_keys):
    """fleet.server.FleetServer with this link as its ingest link: stored, and the stats line
    and the ingest stats say so (what `litefleet server` reports)."""
    from fleet.repository import BlobStore
    from fleet.server import FleetServer, ServerOptions
    store = open_store(str(tmp_path / "fleet.db"))
    ingest_link = IngestLink(mosquitto.url, "srv-ingest", backoff=FAST)
    repo_link = MqttLink(mosquitto.url, "srv", backoff=FAST)
    server = FleetServer(repo_link, BlobStore(tmp_path / "repo", trusted_keys),
                         ServerOptions(fleet="tf", data_dir=tmp_path, http_port=-1), store=store,
                         ingest_link=ingest_link)
    server.start()
    made.append(server)
    wait_for(lambda: server.ingestor.stats()["subscribed"], 10, "the server's ingest subscribed")
    dev = device_link(mosquitto.url, made)
    publish_all(dev, [("lf/v1/tf/device/d1/telemetry",
                       encode({"v": 1, "device_id": "d1", "seq": s, "ts": 1.0, "data": {}})) for s in (0, 1, 3)])
    wait_for(lambda: server.ingestor.stats()["acked"] == 3, 10, "3 messages acknowledged")
    assert store.losses()["d1"] == {"received": 3, "min_seq": 0, "max_seq": 3, "lost": 1}
    stats = server.ingestor.stats()
    assert stats["connected"] and stats["problem"] is None and stats["telemetry"] == 3
    assert "ingest 3 msgs" in server.stats_line() and "PROBLEM" not in server.stats_line()
