"""agent/blob_link.py against a real mosquitto: the connection a device pulls models on.

Plain-TCP brokers started here (one with a small in-flight limit, so that an unacknowledged
QoS 1 message would stop the flow), and the project's generated TLS configuration with its ACL
for identity and refusals. The Downloader over this link is tested in test_pull.py.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from agent.blob_link import BlobLink
from agent.mqtt import MqttLink, NotConnected, TlsFiles
from agent.mqtt_wire import PacketReader
from tests.support.agents import wait_for
from tests.support.broker import HOST, mosquitto, mosquitto_factory  # noqa: F401 (fixtures)

FAST = (0.05, 0.3)


class Inbox:
    """Collects what a handler receives; wait for a count."""

    def __init__(self) -> None:
        self.messages: list = []
        self._cond = threading.Condition()

    def __call__(self, message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= count, timeout)


@pytest.fixture
def made():
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def main_link(url: str, made: list, name: str = "main", **kwargs) -> MqttLink:
    link = MqttLink(url, name, clean_start=True, session_expiry_s=0, backoff=FAST, **kwargs)
    link.start()
    made.append(link)
    assert link.wait_connected(10)
    return link


def test_connected_only_from_the_first_subscribe_to_the_last_unsubscribe(mosquitto, made):
    link = BlobLink(mosquitto.url, "d1.blob", backoff=FAST)
    made.append(link)
    assert not link.connected and link.connect_info is None
    first = link.subscribe("blob/a", Inbox())
    assert first.wait(10) and link.connected
    second = link.subscribe("blob/b", Inbox())
    assert second.wait(10)
    link.unsubscribe("blob/a")
    assert link.connected, "one stream is still subscribed"
    link.unsubscribe("blob/b")
    assert not link.connected and link._thread is None
    again = link.subscribe("blob/c", Inbox())
    assert again.wait(10), "a later fetch opens a new connection"


def test_every_qos1_message_is_acknowledged_so_the_broker_keeps_sending(mosquitto_factory, made):
    """With 10 in flight per client, the 11th message only comes once earlier ones are acked."""
    broker = mosquitto_factory(lambda port: f"listener {port} {HOST}\nallow_anonymous true\n"
                                            "max_inflight_messages 10\nmax_queued_messages 0\n")
    inbox = Inbox()
    link = BlobLink(broker.url, "d1.blob", backoff=FAST)
    made.append(link)
    assert link.subscribe("blob/x/chunks", inbox).wait(10)
    sender = main_link(broker.url, made, "repo")
    payloads = [bytes([n % 256]) * 20_000 for n in range(300)]
    for payload in payloads:
        sender.publish("blob/x/chunks", payload, qos=1)
    assert inbox.wait(300, 30), f"{len(inbox.messages)} of 300 arrived"
    assert [m.payload for m in inbox.messages] == payloads, "whole, in order"
    assert {m.qos for m in inbox.messages} == {1} and {m.topic for m in inbox.messages} == {"blob/x/chunks"}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_requests_published_on_the_link_reach_the_repository(mosquitto, made, protocol):
    received = Inbox()
    repo = main_link(mosquitto.url, made, "repo")
    assert repo.subscribe("req/+", received, qos=1).wait(10)
    link = BlobLink(mosquitto.url, "d1.blob", protocol=protocol, backoff=FAST)
    made.append(link)
    stream = Inbox()
    assert link.subscribe("blob/y", stream).wait(10)
    assert link.protocol_version == protocol and link.connect_info.protocol == protocol
    link.publish("req/d1", b'{"chunks": [1, 2]}', qos=1)
    link.publish("req/d1", b'{"chunks": [3]}', qos=0)
    assert received.wait(2)
    assert sorted(m.payload for m in received.messages) == [b'{"chunks": [1, 2]}', b'{"chunks": [3]}']
    repo.publish("blob/y", b"chunk", qos=1)
    assert stream.wait(1) and stream.messages[0].payload == b"chunk"


def test_the_protocol_is_asked_at_each_connect(mosquitto, made):
    asked: list[str] = []
    link = BlobLink(mosquitto.url, "d1.blob", protocol=lambda: asked.append("3.1.1") or "3.1.1", backoff=FAST)
    made.append(link)
    assert link.subscribe("blob/z", Inbox()).wait(10)
    assert asked == ["3.1.1"] and link.protocol_version == "3.1.1"


def test_publish_without_a_connection_says_so(mosquitto, made):
    link = BlobLink(mosquitto.url, "d1.blob", backoff=FAST)
    made.append(link)
    with pytest.raises(NotConnected, match="d1.blob is not connected"):
        link.publish("req/d1", b"{}")


def test_a_broker_restart_reconnects_and_subscribes_again(mosquitto_factory, made, caplog):
    caplog.set_level(logging.WARNING, logger="litefleet.blob_link")
    broker = mosquitto_factory()
    inbox = Inbox()
    link = BlobLink(broker.url, "d1.blob", backoff=FAST)
    made.append(link)
    token = link.subscribe("blob/r", inbox)
    assert token.wait(10)
    broker.restart(kill=True)
    wait_for(lambda: "lost its connection" in caplog.text, 10, "the link to notice")
    assert token.wait(15), "subscribed again on the new connection"
    assert link.connect_info.session_present is False
    sender = main_link(broker.url, made, "repo")
    sender.publish("blob/r", b"after", qos=1)
    assert inbox.wait(1, 10) and inbox.messages[-1].payload == b"after"


def test_a_failing_handler_is_logged_and_the_connection_kept(mosquitto, made, caplog):
    caplog.set_level(logging.ERROR, logger="litefleet.blob_link")
    good = Inbox()

    def bad(message) -> None:
        raise ValueError("boom")

    link = BlobLink(mosquitto.url, "d1.blob", backoff=FAST)
    made.append(link)
    assert link.subscribe("blob/h/#", bad).wait(10)
    assert link.subscribe("blob/h/ok", good).wait(10)
    sender = main_link(mosquitto.url, made, "repo")
    sender.publish("blob/h/ok", b"1", qos=1)
    assert good.wait(1)
    assert "handler for blob/h/# failed on a message on blob/h/ok" in caplog.text
    assert link.connected


def test_mutual_tls_identity_and_acl_of_the_generated_broker_configuration(made, tmp_path, caplog):
    """The device's certificate is its identity on this connection too, not the client id: with
    d1's certificate and the client id "d2.blob", requests go out as d1's and the blob stream
    comes in; asking as d2 is refused by the broker's ACL."""
    from fleet import broker as broker_mod
    from fleet.broker import BrokerSettings, parse_device_spec
    from tests.support.broker import free_port
    from tests.test_broker_acl import RUN_AS, GeneratedMosquitto
    caplog.set_level(logging.WARNING, logger="litefleet.blob_link")
    settings = BrokerSettings("tf", port=free_port(), run_as=RUN_AS)
    layout = broker_mod.generate(tmp_path / "broker", settings,
                                 [parse_device_spec("d1:lab@x86-cpu"), parse_device_spec("d2:lab@x86-cpu")]).layout
    mosq = GeneratedMosquitto(layout, settings).start()
    made.append(mosq)
    url = f"mqtts://127.0.0.1:{mosq.port}"

    def tls(identity: str) -> TlsFiles:
        return TlsFiles(str(layout.ca_cert), str(layout.client_cert(identity)), str(layout.client_key(identity)))

    server = main_link(url, made, "litefleet-server", tls=tls("litefleet-server"))
    requests = Inbox()
    assert server.subscribe("lf/v1/tf/device/+/chunkreq", requests, qos=1).wait(10)
    link = BlobLink(url, "d2.blob", tls=tls("d1"), backoff=FAST)
    made.append(link)
    stream = "lf/v1/tf/blob/" + "a" * 64 + "/chunks"
    chunks = Inbox()
    token = link.subscribe(stream, chunks)
    assert token.wait(10)
    link.publish("lf/v1/tf/device/d1/chunkreq", b"as d1", qos=1)
    assert requests.wait(1)
    assert server.publish(stream, b"chunk", qos=1).wait(5)
    assert chunks.wait(1), "the blob stream reaches the device"
    # Asking as d2: mosquitto 2.0.11 answers PUBACK "not authorized" and drops the connection;
    # the link reconnects (and subscribes again), and only d1's own requests ever arrived.
    link.publish("lf/v1/tf/device/d2/chunkreq", b"as d2", qos=1)
    wait_for(lambda: "lost its connection" in caplog.text, 10, "the broker to drop the forgery")
    assert token.wait(10), "reconnected and subscribed again"
    link.publish("lf/v1/tf/device/d1/chunkreq", b"as d1 again", qos=1)
    assert requests.wait(2)
    assert [(m.topic, m.payload) for m in requests.messages] == [("lf/v1/tf/device/d1/chunkreq", b"as d1"),
                                                                  ("lf/v1/tf/device/d1/chunkreq", b"as d1 again")]


def test_a_subscription_the_broker_refuses_is_named_and_the_connection_kept(made):
    """mosquitto 2.0.11 grants in its SUBACK what its ACL will not deliver (test_broker_acl.py);
    other brokers refuse such a subscription in the SUBACK. This server speaks just that refusal."""
    server = socket.create_server((HOST, 0))
    made.append(_Closing(server))
    seen: list[int] = []

    def serve() -> None:
        conn, _ = server.accept()
        made.append(_Closing(conn))
        reader = PacketReader()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:      # closed at teardown
                return
            if not data:
                return
            for first, body in reader.feed(data, 1)[1]:
                seen.append(first)
                if first == 0x10:
                    conn.sendall(b"\x20\x03\x00\x00\x00")                       # CONNACK: accepted
                elif first == 0x82:
                    conn.sendall(b"\x90\x04" + body[:2] + b"\x00\x87")           # SUBACK: not authorized

    threading.Thread(target=serve, daemon=True).start()
    link = BlobLink(f"mqtt://{HOST}:{server.getsockname()[1]}", "d1.blob", backoff=FAST)
    made.append(link)
    token = link.subscribe("lf/v1/tf/blob/x/chunks", Inbox())
    wait_for(lambda: token.refused, 10, "the refusal")
    assert token.refused == "broker refused the subscription to lf/v1/tf/blob/x/chunks (0x87 (not authorized))"
    assert not token.wait(0) and link.connected and link.last_error == token.refused


class _Closing:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def stop(self) -> None:
        self.sock.close()
