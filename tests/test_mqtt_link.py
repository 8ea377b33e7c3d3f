"""agent.mqtt.MqttLink against a real mosquitto (tests/support/broker.py) on a free port."""

from __future__ import annotations

import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.mqtt import (ConnectInfo, Message, MqttError, MqttLink, NotConnected, PacketTooLarge, TlsFiles, Will,
                        backoff_delay, parse_url)
from tests.support.broker import mosquitto, mosquitto_factory, plain_config  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FAST = (0.05, 0.5)  # backoff for tests: a restarted broker is found again quickly


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Inbox:
    """A handler that records messages and lets a test wait for a count."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= count, timeout)

    def wait_topic(self, topic: str, timeout: float = 5.0) -> Message | None:
        with self._cond:
            self._cond.wait_for(lambda: any(m.topic == topic for m in self.messages), timeout)
            return next((m for m in self.messages if m.topic == topic), None)

    @property
    def payloads(self) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages]


@pytest.fixture
def links():
    """Create links that are stopped at teardown."""
    made: list[MqttLink] = []

    def make(url: str, client_id: str, **kwargs) -> MqttLink:
        kwargs.setdefault("backoff", FAST)
        link = MqttLink(url, client_id, **kwargs)
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


def started(link: MqttLink, timeout: float = 5.0) -> MqttLink:
    link.start()
    assert link.wait_connected(timeout), f"{link.client_id} did not connect: {link.last_error}"
    return link


# -- pure functions -----------------------------------------------------------------------------

def test_backoff_is_bounded_by_the_exponential_ceiling_and_the_cap():
    rng = random.Random(7)
    for attempt in range(0, 200):
        ceiling = min(60.0, 0.5 * 2 ** min(attempt, 60))
        for _ in range(50):
            delay = backoff_delay(attempt, 0.5, 60.0, rng)
            assert 0.0 <= delay <= ceiling


def test_backoff_grows_with_attempts_until_the_cap():
    rng = random.Random(1)
    means = [statistics.mean(backoff_delay(n, 0.5, 60.0, rng) for _ in range(2000)) for n in range(9)]
    assert all(later > earlier for earlier, later in zip(means, means[1:7])), means
    # expected mean of uniform(0, c) is c/2: 0.25 at attempt 0, capped at 30 from attempt 7 on
    assert means[0] == pytest.approx(0.25, rel=0.1)
    assert means[8] == pytest.approx(30.0, rel=0.1)


def test_backoff_jitter_spreads_a_fleet_over_the_window():
    """1000 devices losing the broker at once must not come back in lockstep."""
    rng = random.Random(3)
    delays = [backoff_delay(5, 0.5, 60.0, rng) for _ in range(1000)]  # window [0, 16]
    assert len({round(d, 3) for d in delays}) > 900
    buckets = [sum(1 for d in delays if i * 4 <= d < (i + 1) * 4) for i in range(4)]
    assert min(buckets) > 150, buckets  # roughly uniform over the whole window
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.5, 60.0)


def test_parse_url_defaults_and_errors():
    assert parse_url("mqtt://broker") == ("broker", 1883, False)
    assert parse_url("mqtts://broker") == ("broker", 8883, True)
    assert parse_url("mqtt://127.0.0.1:4000") == ("127.0.0.1", 4000, False)
    with pytest.raises(MqttError, match="mqtt://host:port"):
        parse_url("http://broker:80")
    with pytest.raises(MqttError, match="needs TLS files"):
        MqttLink("mqtts://broker", "x")


# -- against mosquitto ----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, expected, log_tag", [("5", "5", "p5"), ("3.1.1", "3.1.1", "p2"),
                                                         ("auto", "5", "p5")])
def test_round_trip_and_negotiated_protocol(mosquitto, links, protocol, expected, log_tag):
    infos: list[ConnectInfo] = []
    link = links(mosquitto.url, f"rt-{protocol}", protocol=protocol, on_connect=infos.append)
    inbox = Inbox()
    link.subscribe("rt/#", inbox)
    started(link)
    assert link.protocol_version == expected
    # mosquitto logs the protocol it accepted: p2 = MQTT 3.1.1, p5 = MQTT 5
    assert wait_until(lambda: f"as rt-{protocol} ({log_tag}," in mosquitto.log), mosquitto.log[-500:]
    token = link.publish("rt/a", b"payload-1", qos=1)
    assert token.wait(5) and token.acked
    assert inbox.wait_for(1)
    assert inbox.messages[0].topic == "rt/a" and inbox.messages[0].payload == b"payload-1"
    assert inbox.messages[0].qos == 1
    assert wait_until(lambda: infos) and infos[0].protocol == expected
    assert not infos[0].session_present


def test_qos0_while_down_raises_and_qos1_token_waits(links):
    link = links("mqtt://127.0.0.1:9", "never")  # nothing listens on the discard port
    with pytest.raises(NotConnected, match="not connected"):
        link.publish("x/y", b"0", qos=0)
    token = link.publish("x/y", b"1", qos=1)  # queued until a connection exists
    assert not token.wait(0.05) and not token.acked


def test_message_expiry_and_response_properties_reach_the_subscriber(mosquitto, links):
    link = started(links(mosquitto.url, "props", protocol="5"))
    inbox = Inbox()
    link.subscribe("req/#", inbox)
    assert link.publish("req/1", b"q", expiry_s=120, response_topic="resp/1", correlation=b"\x01\x02").wait(5)
    assert inbox.wait_for(1)
    props = inbox.messages[0].properties
    assert props["response_topic"] == "resp/1"
    assert props["correlation_data"] == b"\x01\x02"
    assert 0 < props["message_expiry"] <= 120


def test_expired_retained_message_is_not_delivered(mosquitto, links):
    """MessageExpiryInterval really expires: a late subscriber gets only the unexpired message."""
    pub = started(links(mosquitto.url, "exp-pub", protocol="5"))
    t0 = time.monotonic()
    assert pub.publish("ret/short", b"gone soon", retain=True, expiry_s=1).wait(5)
    assert pub.publish("ret/long", b"stays", retain=True, expiry_s=600).wait(5)
    wait_until(lambda: time.monotonic() - t0 > 2.1, timeout=3)  # let the 1 s expiry pass
    late = started(links(mosquitto.url, "exp-sub", protocol="5"))
    inbox = Inbox()
    assert late.subscribe("ret/#", inbox).wait(5)
    assert inbox.wait_topic("ret/long") is not None
    assert pub.publish("ret/marker", b"m").wait(5)  # retained ones come before this
    assert inbox.wait_topic("ret/marker") is not None
    assert [m.topic for m in inbox.messages] == ["ret/long", "ret/marker"]


def test_retained_message_and_clear(mosquitto, links):
    pub = started(links(mosquitto.url, "ret-pub"))
    assert pub.publish("dev/1/status", b"online", retain=True).wait(5)

    first = started(links(mosquitto.url, "ret-sub-1"))
    inbox = Inbox()
    first.subscribe("dev/+/status", inbox)
    message = inbox.wait_topic("dev/1/status")
    assert message is not None and message.retain and message.payload == b"online"

    assert pub.clear_retained("dev/1/status").wait(5)
    second = started(links(mosquitto.url, "ret-sub-2"))
    later = Inbox()
    assert second.subscribe("dev/#", later).wait(5)  # before another client publishes the marker
    assert pub.publish("dev/marker", b"m").wait(5)
    assert later.wait_topic("dev/marker") is not None
    assert [m.topic for m in later.messages] == ["dev/marker"], "the cleared retained message came back"


WILL_CLIENT = """
import sys
from agent.mqtt import MqttLink, Will
link = MqttLink(sys.argv[1], "will-client", will=Will("dev/w/status", b"offline"))
link.start()
assert link.wait_connected(10), link.last_error
print("connected", flush=True)
sys.stdin.readline()
"""


def test_will_is_published_when_the_process_is_killed(mosquitto, links):
    watcher = started(links(mosquitto.url, "will-watcher"))
    inbox = Inbox()
    assert watcher.subscribe("dev/w/status", inbox).wait(5)
    proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, mosquitto.url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "connected"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        message = inbox.wait_topic("dev/w/status")
        assert message is not None and message.payload == b"offline"
    finally:
        proc.kill()
        proc.wait()


def test_will_is_not_published_on_clean_stop(mosquitto, links):
    watcher = started(links(mosquitto.url, "will-watcher-2"))
    inbox = Inbox()
    assert watcher.subscribe("dev/c/#", inbox).wait(5)
    link = started(links(mosquitto.url, "clean-client", will=Will("dev/c/status", b"offline")))
    link.stop()
    assert not link.connected
    # mosquitto logs a clean DISCONNECT as "Client X disconnected."; wait for it, then a marker
    assert wait_until(lambda: "Client clean-client disconnected." in mosquitto.log), mosquitto.log[-800:]
    assert watcher.publish("dev/c/marker", b"m").wait(5)
    assert inbox.wait_topic("dev/c/marker") is not None
    assert [m.topic for m in inbox.messages] == ["dev/c/marker"]


def test_slow_handler_blocks_neither_other_subscriptions_nor_keepalive(mosquitto, links):
    """A handler stuck for seconds: another subscription still gets its messages and the network
    thread still sends keepalive PINGREQs (mosquitto logs them) while the handler is blocked."""
    disconnects: list[str] = []
    link = started(links(mosquitto.url, "slow", keepalive_s=1, on_disconnect=disconnects.append))
    entered, release, done = threading.Event(), threading.Event(), threading.Event()
    slow_threads: list[str] = []

    def slow(message: Message) -> None:
        slow_threads.append(threading.current_thread().name)
        entered.set()
        release.wait(5.0)
        done.set()

    fast = Inbox()
    link.subscribe("slow/#", slow)
    link.subscribe("fast/#", fast)
    link.publish("slow/1", b"s")
    assert entered.wait(5)
    pings_before = mosquitto.log.count("Received PINGREQ from slow")
    link.publish("fast/1", b"f")
    assert fast.wait_for(1, timeout=1.0), "a blocked handler stopped another subscription"
    assert wait_until(lambda: mosquitto.log.count("Received PINGREQ from slow") > pings_before, timeout=3.0), \
        "no keepalive while a handler was blocked"
    assert not done.is_set()  # all of the above happened while the slow handler was still stuck
    release.set()
    assert done.wait(5)
    assert link.connected and not disconnects, disconnects
    assert link.publish("fast/2", b"f2").wait(5) and fast.wait_for(2)
    assert not any(name.startswith("mqtt-net") for name in slow_threads + list(fast.threads))


def test_a_failing_handler_does_not_kill_the_link(mosquitto, links):
    link = started(links(mosquitto.url, "faulty"))
    seen = Inbox()

    def handler(message: Message) -> None:
        seen(message)
        if message.payload == b"bad":
            raise RuntimeError("handler bug")

    link.subscribe("f/#", handler)
    link.publish("f/1", b"bad")
    link.publish("f/2", b"good")
    assert seen.wait_for(2)
    assert seen.payloads == [b"bad", b"good"] and link.connected


def test_broker_killed_and_restarted_link_reconnects_and_delivers_queued_qos1(mosquitto, links):
    connects: list[ConnectInfo] = []
    disconnects: list[str] = []
    link = links(mosquitto.url, "survivor", on_connect=connects.append, on_disconnect=disconnects.append)
    inbox = Inbox()
    link.subscribe("tele/#", inbox)
    started(link)

    mosquitto.kill()
    assert wait_until(lambda: not link.connected) and wait_until(lambda: disconnects)
    tokens = [link.publish(f"tele/{i}", f"m{i}".encode(), qos=1) for i in range(5)]
    assert not any(t.acked for t in tokens)

    mosquitto.start()  # same port, same persistence dir
    assert link.wait_connected(10), link.last_error
    assert all(t.wait(5) for t in tokens)
    assert inbox.wait_for(5), inbox.payloads
    assert inbox.payloads == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert wait_until(lambda: len(connects) == 2)
    assert len(disconnects) == 1


def test_persistent_session_gets_messages_sent_while_offline_across_a_broker_restart(mosquitto, links):
    """clean_start=False + session expiry: QoS 1 messages wait at the broker for the device."""
    first = links(mosquitto.url, "sleeper", protocol="5")
    subscription = first.subscribe("cmd/sleeper", Inbox())
    assert not subscription.wait(0.01)  # not started: nothing granted yet
    started(first)
    assert subscription.wait(5)  # granted on connect
    first.stop()

    operator = started(links(mosquitto.url, "operator"))
    assert all(operator.publish("cmd/sleeper", f"c{i}".encode()).wait(5) for i in range(3))
    operator.stop()
    mosquitto.restart()  # SIGTERM saves the session and its queue; same port

    infos: list[ConnectInfo] = []
    again = links(mosquitto.url, "sleeper", protocol="5", on_connect=infos.append)
    inbox = Inbox()
    again.subscribe("cmd/sleeper", inbox)
    started(again)
    assert inbox.wait_for(3), inbox.payloads
    assert inbox.payloads == [b"c0", b"c1", b"c2"]
    assert wait_until(lambda: infos) and infos[0].session_present


def test_connack_maximum_packet_size_is_honoured(mosquitto_factory, links):
    broker = mosquitto_factory(lambda port: plain_config(port, "max_packet_size 2000"))
    link = started(links(broker.url, "small", protocol="5"))
    assert link.max_packet_size == 2000
    with pytest.raises(PacketTooLarge, match="at most 2000"):
        link.publish("big/1", b"x" * 3000)
    assert link.publish("big/2", b"x" * 1500).wait(5)
    assert link.connected


class V311OnlyGate:
    """A TCP front for mosquitto that refuses MQTT 5 like a 3.1.1-only broker (amqtt) does.

    It answers a CONNECT with protocol level 5 by a 3.1.1 CONNACK 'unacceptable protocol
    version' (0x01) and pipes every other connection to the real mosquitto behind it.
    """

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = conn.recv(2)
        length, shift, raw = 0, 0, bytearray(head)
        byte = head[1]
        while True:
            length += (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            byte = conn.recv(1)[0]
            raw.append(byte)
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        if body[6] == 5:  # 00 04 'MQTT' <level>
            self.refused += 1
            conn.sendall(b"\x20\x02\x00\x01")
            conn.close()
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        backend.sendall(bytes(raw) + body)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(backend, conn), daemon=True).start()
        pipe(conn, backend)

    def close(self) -> None:
        self.server.close()


def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5(mosquitto, links):
    gate = V311OnlyGate(mosquitto.port)
    try:
        link = links(f"mqtt://127.0.0.1:{gate.port}", "legacy", protocol="auto")
        inbox = Inbox()
        link.subscribe("legacy/#", inbox)
        started(link)
        assert gate.refused == 1
        assert link.protocol_version == "3.1.1"
        assert "as legacy (p2," in mosquitto.log
        assert link.publish("legacy/x", b"ok", expiry_s=30).wait(5)  # v5 extras dropped, not an error
        assert inbox.wait_for(1) and inbox.messages[0].properties == {}

        pinned = links(f"mqtt://127.0.0.1:{gate.port}", "pinned5", protocol="5")
        pinned.start()
        assert not pinned.wait_connected(1.0)
        assert "Unsupported protocol version" in (pinned.last_error or ""), pinned.last_error
    finally:
        gate.close()


def test_publish_refused_by_the_broker_acl_is_reported(mosquitto_factory, links, tmp_path):
    """MQTT 5 PUBACK reason codes: an ACL-denied publish is acked with 'Not authorized'."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    broker = mosquitto_factory(lambda port: plain_config(port, f"acl_file {acl}"))
    link = started(links(broker.url, "acl-client", protocol="5"))
    ok = link.publish("allowed/x", b"1")
    denied = link.publish("forbidden/x", b"2")
    assert ok.wait(5) and denied.wait(5)
    assert ok.refused is None
    assert denied.refused == "Not authorized"


def test_stop_then_start_again_keeps_subscriptions_and_resumes_the_session(mosquitto, links):
    link = links(mosquitto.url, "again", protocol="5")
    inbox = Inbox()
    link.subscribe("again/#", inbox)
    started(link)
    assert link.publish("again/1", b"a").wait(5) and inbox.wait_for(1)
    link.stop()
    started(link)
    assert link.connect_info is not None and link.connect_info.session_present
    assert link.publish("again/2", b"b").wait(5) and inbox.wait_for(2)
    assert inbox.payloads == [b"a", b"b"]


def test_messages_of_a_resumed_session_wait_for_a_late_subscribe(mosquitto, links):
    """start() before subscribe(): queued messages arriving right after CONNACK are not lost."""
    first = links(mosquitto.url, "late", protocol="5")
    subscription = first.subscribe("late/#", Inbox())
    started(first)
    assert subscription.wait(5)
    first.stop()
    operator = started(links(mosquitto.url, "late-operator"))
    assert operator.publish("late/cmd", b"queued").wait(5)

    again = started(links(mosquitto.url, "late", protocol="5"))
    assert wait_until(lambda: "Sending PUBLISH to late" in mosquitto.log)
    inbox = Inbox()
    again.subscribe("late/#", inbox)
    assert inbox.wait_for(1) and inbox.payloads == [b"queued"]


def _make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with CN 'dev-1'."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        paths[f"{name}_key"] = directory / f"{name}.key"
        paths[f"{name}_cert"] = directory / f"{name}.crt"
        paths[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(cn: str, key, issuer_name, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    write("ca", ca_key, build("test-ca", ca_key, ca_name, ca_key, True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, build("127.0.0.1", server_key, ca_name, ca_key, False,
                                      [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, build("dev-1", client_key, ca_name, ca_key, False))
    return paths


def test_mutual_tls_link_over_mqtts(mosquitto_factory, links, tmp_path):
    """mqtts:// with a client certificate; the broker takes the identity from the certificate."""
    pki = _make_pki(tmp_path)
    body = (f"cafile {pki['ca_cert']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
            "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
    broker = mosquitto_factory(body)
    url = f"mqtts://127.0.0.1:{broker.port}"
    tls = TlsFiles(str(pki["ca_cert"]), str(pki["client_cert"]), str(pki["client_key"]))
    link = links(url, "tls-client", tls=tls)
    inbox = Inbox()
    link.subscribe("secure/#", inbox)
    started(link)
    assert link.publish("secure/x", b"s").wait(5) and inbox.wait_for(1)
    assert "as tls-client (p5," in broker.log and "u'dev-1'" in broker.log
    assert link.connect_info.receive_maximum == 20  # mosquitto's default max_inflight_messages

    plain = links(broker.url, "no-tls")
    plain.start()
    assert not plain.wait_connected(0.5)  # a TLS listener does not speak plain MQTT


def test_broker_receive_maximum_is_reported_and_nothing_is_lost(mosquitto_factory, links):
    """CONNACK Receive Maximum 3 is reported, and 50 QoS 1 messages all arrive, in order.

    (mosquitto 2.0.11 tolerates a client exceeding it, so the cap itself is not observable here.)"""
    broker = mosquitto_factory(lambda port: plain_config(port).replace("max_inflight_messages 0",
                                                                       "max_inflight_messages 3"))
    link = links(broker.url, "rm", protocol="5", max_inflight=20)
    inbox = Inbox()
    link.subscribe("rm/#", inbox)
    started(link)
    assert link.connect_info.receive_maximum == 3
    tokens = [link.publish(f"rm/{i}", str(i).encode()) for i in range(50)]
    assert all(t.wait(5) for t in tokens)
    assert inbox.wait_for(50)
    assert inbox.payloads == [str(i).encode() for i in range(50)]
