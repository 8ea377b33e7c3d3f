"""The generated broker configuration, enforced by a REAL mosquitto 2.0 with real TLS clients.

Each absence ("device A's forged message never arrives") is proven against a positive control:
a message that must arrive is published right after the forbidden one, over the same broker to
the same subscriber; mosquitto handles one connection's packets in order and our publisher waits
for its PUBACK before the control is sent, so once the control is in, a forged message that had
been let through would already be there.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.topics import Topics
from fleet import broker as broker_mod
from fleet.broker import BrokerSettings, Layout, parse_device_spec, render_mosquitto_conf
from tests.support.broker import Mosquitto, free_port

FLEET = "acltest"
T = Topics(FLEET)
BLOB = "ab" * 32
TIMEOUT = 10.0
DEVICES = ["dev-a:g1@prof-a", "dev-b:g2@prof-b"]
RUN_AS = "root" if os.geteuid() == 0 else ""  # as root, mosquitto would drop to 'mosquitto' and not read our key


class GeneratedMosquitto(Mosquitto):
    """tests.support.broker.Mosquitto running our generated file as it is.

    The base class appends its own persistence and log lines, which mosquitto refuses as
    duplicates of ours; here the file is exactly what ``render_mosquitto_conf`` returns.
    """

    def __init__(self, layout: Layout, settings: BrokerSettings) -> None:
        self._settings, self._layout = settings, layout
        super().__init__(lambda port: render_mosquitto_conf(self._with_port(port), layout), layout.root / "run")
        self.log_path = layout.log

    def _with_port(self, port: int) -> BrokerSettings:
        return dataclasses.replace(self._settings, port=port, bind_address="127.0.0.1")

    def _render(self, port: int) -> str:
        return self._config(port)


def make_config(directory: Path, devices=DEVICES) -> Layout:
    settings = BrokerSettings(FLEET, port=free_port(), run_as=RUN_AS)
    return broker_mod.generate(directory, settings, [parse_device_spec(d) for d in devices]).layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return make_config(tmp_path_factory.mktemp("broker"))


@pytest.fixture(scope="module")
def running(layout):
    settings = BrokerSettings(FLEET, run_as=RUN_AS)
    with GeneratedMosquitto(layout, settings) as mosq:
        yield mosq


class Client:
    """A paho client with a client certificate, and waits on conditions (never sleeps)."""

    def __init__(self, layout: Layout, identity: str | None, port: int, *, client_id: str | None = None,
                 protocol: int = mqtt.MQTTv5, username: str | None = None, ca_cert: Path | None = None,
                 clean: bool = True, cert_pair: tuple[Path, Path] | None = None) -> None:
        self.client_id = client_id or f"{identity or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.protocol = protocol
        kwargs = {"clean_session": clean} if protocol != mqtt.MQTTv5 else {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol, **kwargs)
        cert = str(layout.client_cert(identity)) if identity else None
        key = str(layout.client_key(identity)) if identity else None
        if cert_pair:
            cert, key = map(str, cert_pair)
        self.c.tls_set(ca_certs=str(ca_cert or layout.ca_cert), certfile=cert, keyfile=key)
        if username:
            self.c.username_pw_set(username, "ignored")
        self.port = port
        self.clean = clean
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.outcome: queue.Queue[str] = queue.Queue()
        self._subacks: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_subscribe = self._on_subscribe
        self.pubacks: dict[int, str] = {}
        self.session_present = False
        self.c.on_publish = lambda c, u, mid, rc, props: self.pubacks.__setitem__(mid, str(rc))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present = flags.session_present
        self.outcome.put("connected" if not reason_code.is_failure else f"refused: {reason_code}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.outcome.put(f"disconnected: {reason_code}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._subacks.setdefault(mid, queue.Queue()).put(reason_codes)

    def try_connect(self) -> str:
        """'connected', or how the attempt ended (TLS error, refusal, disconnect)."""
        props = None
        if self.protocol == mqtt.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            if not self.clean:
                props.SessionExpiryInterval = 3600
        try:
            if self.protocol == mqtt.MQTTv5:
                self.c.connect("127.0.0.1", self.port, clean_start=self.clean, properties=props)
            else:
                self.c.connect("127.0.0.1", self.port)
        except (ssl.SSLError, OSError) as exc:
            return f"error: {exc}"
        self.c.loop_start()
        try:
            return self.outcome.get(timeout=TIMEOUT)
        except queue.Empty:
            return "timeout"

    def connect(self) -> "Client":
        outcome = self.try_connect()
        assert outcome == "connected", f"{self.client_id}: {outcome}"
        return self

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK reason codes (>= 0x80 means refused)."""
        result, mid = self.c.subscribe([(f, 1) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            box = self._subacks.setdefault(mid, queue.Queue())
        return [rc.value for rc in box.get(timeout=TIMEOUT)]

    def publish(self, topic: str, payload: bytes) -> str:
        """Publish at QoS 1 and wait for the broker's PUBACK; its reason ('Success' on MQTT 3.1.1)."""
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic}"
        return self.pubacks.get(info.mid, "")

    def expect(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait for (topic, payload); return every message received before it."""
        before = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                got = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.client_id} did not receive {payload!r} on {topic}; got {before}") from None
            if got == (topic, payload):
                return before
            before.append(got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients(layout, running):
    made: list[Client] = []

    def make(identity: str | None, **kwargs) -> Client:
        client = Client(layout, identity, running.port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def attempt(clients):
    """Publish one forbidden message from a fresh connection and return the PUBACK reason.

    mosquitto 2.0.11 answers a denied QoS 1 publish with a PUBACK ('Not authorized' on MQTT 5)
    and then drops the connection (eclipse-mosquitto/mosquitto#2579), so each try gets its own.
    """
    def publish(identity: str, topic: str, payload: bytes, **kwargs) -> str:
        client = clients(identity, **kwargs).connect()
        try:
            return client.publish(topic, payload)
        finally:
            client.close()
    return publish


def token(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


# --- the configuration itself -------------------------------------------------------------------

def test_generated_config_has_tuning_and_mosquitto_runs_it_unchanged(tmp_path):
    """The exact file written to DIR/mosquitto.conf starts mosquitto 2.0.11 and listens on its port."""
    layout = make_config(tmp_path / "cfg")
    text = layout.conf.read_text()
    assert "set_tcp_nodelay true" in text.splitlines()
    assert f"max_packet_size {broker_mod.DEFAULT_CHUNK_SIZE + 64 * 1024}" in text.splitlines()
    assert "max_queued_messages 0" in text.splitlines()
    assert f"max_queued_bytes {broker_mod.DEFAULT_MAX_QUEUED_BYTES}" in text.splitlines()
    assert f"max_inflight_messages {broker_mod.DEFAULT_MAX_INFLIGHT}" in text.splitlines()
    port = int(next(line.split()[1] for line in text.splitlines() if line.startswith("listener ")))
    import subprocess
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(layout.conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        listening = False
        while time.monotonic() < deadline and proc.poll() is None and not listening:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                listening = True
            except OSError:
                time.sleep(0.02)  # poll interval of a deadline loop
        assert listening, f"mosquitto exited {proc.poll()}: {proc.stdout.read().decode() if proc.poll() is not None else ''}"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=TIMEOUT)[0].decode()
    assert "Error" not in out, out
    assert "mosquitto version 2.0" in layout.log.read_text()


# --- who may do what -----------------------------------------------------------------------------

def test_device_publishes_its_own_telemetry_and_the_server_receives_it(clients):
    server = clients("litefleet-server").connect()
    assert server.subscribe(T.all_devices("telemetry"), T.all_devices("status")) == [1, 1]
    a = clients("dev-a").connect()
    telemetry, status = token("telemetry"), token("status")
    a.publish(str(T.telemetry("dev-a")), telemetry)
    a.publish(str(T.status("dev-a")), status)
    assert server.expect(str(T.telemetry("dev-a")), telemetry) == []
    assert server.expect(str(T.status("dev-a")), status) == []


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("as_b", [False, True], ids=["own-client-id", "b-client-id-and-username"])
def test_device_cannot_publish_as_another_device(clients, attempt, protocol, as_b):
    """Identity is the certificate's CN: B's client id or B's username give A none of B's rights."""
    server = clients("litefleet-server").connect()
    server.subscribe(*(T.all_devices(ch) for ch in ("status", "telemetry", "events", "chunkreq")))
    kwargs = {"client_id": "dev-b", "username": "dev-b"} if as_b else {}
    for channel in ("status", "telemetry", "events", "chunkreq"):
        reason = attempt("dev-a", str(T.device("dev-b", channel)), token(f"forged-{channel}"),
                         protocol=protocol, **kwargs)
        if protocol == mqtt.MQTTv5:
            assert reason == "Not authorized"
    b = clients("dev-b", client_id="dev-b").connect()
    control = token("control")
    b.publish(str(T.telemetry("dev-b")), control)
    assert server.expect(str(T.telemetry("dev-b")), control) == [], "a forged message from dev-a got through"


def test_device_cannot_read_another_devices_commands(clients):
    """mosquitto 2.0.11 grants these subscriptions in the SUBACK; the read rule bites at delivery."""
    a = clients("dev-a").connect()
    codes = a.subscribe(str(T.commands("device", "dev-b")), str(T.commands("group", "g2")),
                        str(T.commands("profile", "prof-b")), str(T.commands("device", "dev-a")))
    b = clients("dev-b").connect()
    b.subscribe(str(T.commands("device", "dev-b")))
    operator = clients("operator").connect()
    secret, group, profile, control = token("for-b"), token("g2"), token("prof-b"), token("for-a")
    operator.publish(str(T.commands("device", "dev-b")), secret)
    operator.publish(str(T.commands("group", "g2")), group)
    operator.publish(str(T.commands("profile", "prof-b")), profile)
    operator.publish(str(T.commands("device", "dev-a")), control)
    assert b.expect(str(T.commands("device", "dev-b")), secret) == []  # the command was really published
    assert a.expect(str(T.commands("device", "dev-a")), control) == [], f"SUBACK codes were {codes}"


def test_device_cannot_publish_commands(clients, attempt):
    a = clients("dev-a").connect()
    b = clients("dev-b").connect()
    targets = [T.commands("device", "dev-b"), T.commands("group", "g2"), T.commands("profile", "prof-b"),
               T.commands("all"), T.commands("device", "dev-a"), T.commands("group", "g1")]
    assert b.subscribe(*(str(t) for t in targets[:4])) == [1, 1, 1, 1]
    a.subscribe(str(T.commands("device", "dev-a")), str(T.commands("group", "g1")), str(T.commands("all")))
    for target in targets:
        assert attempt("dev-a", str(target), token("forged-command")) == "Not authorized"
    operator = clients("operator").connect()
    control = token("fleet-command")
    operator.publish(str(T.commands("all")), control)
    assert b.expect(str(T.commands("all")), control) == []
    assert a.expect(str(T.commands("all")), control) == []


def test_device_cannot_publish_into_a_blob_stream(clients, attempt):
    b = clients("dev-b").connect()
    assert b.subscribe(str(T.blob_chunks(BLOB))) == [1]
    assert attempt("dev-a", str(T.blob_chunks(BLOB)), token("poisoned-chunk")) == "Not authorized"
    # only the repository serves chunks, not the operator either
    assert attempt("operator", str(T.blob_chunks(BLOB)), token("operator-chunk")) == "Not authorized"
    server = clients("litefleet-server").connect()
    chunk = token("real-chunk")
    server.publish(str(T.blob_chunks(BLOB)), chunk)
    assert b.expect(str(T.blob_chunks(BLOB)), chunk) == []


def test_device_reads_fleet_group_profile_and_own_commands(clients):
    a = clients("dev-a").connect()
    mine = [T.commands("all"), T.commands("group", "g1"), T.commands("profile", "prof-a"),
            T.commands("device", "dev-a")]
    assert a.subscribe(*T.device_subscriptions("dev-a", ("g1",), "prof-a")) == [1, 1, 1, 1]
    operator = clients("operator").connect()
    for target in mine:
        payload = token(target.scope)
        operator.publish(str(target), payload)
        assert a.expect(str(target), payload) == []


def test_server_identity_reads_requests_and_publishes_chunks_and_commands(clients):
    server = clients("litefleet-server").connect()
    assert server.subscribe(T.all_devices("chunkreq"), T.all_devices("events")) == [1, 1]
    a = clients("dev-a").connect()
    a.subscribe(str(T.blob_chunks(BLOB)), str(T.commands("profile", "prof-a")))
    request, event = token("chunkreq"), token("event")
    a.publish(str(T.chunk_requests("dev-a")), request)
    a.publish(str(T.events("dev-a")), event)
    assert server.expect(str(T.chunk_requests("dev-a")), request) == []
    assert server.expect(str(T.events("dev-a")), event) == []
    chunk, command = token("chunk"), token("rollout")
    server.publish(str(T.blob_chunks(BLOB)), chunk)
    server.publish(str(T.commands("profile", "prof-a")), command)
    assert a.expect(str(T.blob_chunks(BLOB)), chunk) == []
    assert a.expect(str(T.commands("profile", "prof-a")), command) == []


def test_queued_commands_of_b_do_not_go_to_a_taking_over_bs_session(clients):
    """A persistent session is bound to its client id, not to the certificate. A resuming B's
    session with B's client id must still receive none of B's commands (ACL checked on delivery)."""
    b = clients("dev-b", client_id="dev-b", clean=False).connect()
    assert b.subscribe(str(T.commands("device", "dev-b"))) == [1]
    b.close()
    operator = clients("operator").connect()
    queued = token("queued-for-b")
    operator.publish(str(T.commands("device", "dev-b")), queued)
    a = clients("dev-a", client_id="dev-b", clean=False).connect()
    assert a.session_present  # A really resumed B's session, subscriptions and queue
    a.subscribe(str(T.commands("device", "dev-a")))
    control = token("for-a")
    operator.publish(str(T.commands("device", "dev-a")), control)
    assert a.expect(str(T.commands("device", "dev-a")), control) == []


# --- who may connect at all ----------------------------------------------------------------------

def test_client_without_certificate_cannot_connect(clients):
    outcome = clients(None).try_connect()
    assert outcome != "connected" and outcome != "timeout", outcome
    assert clients("dev-a").try_connect() == "connected"  # the same broker takes a proper client


def test_client_with_certificate_from_another_ca_cannot_connect(layout, running, tmp_path):
    other = make_config(tmp_path / "other")  # its own CA, and a 'dev-a' certificate of its own
    # trust the real broker's CA, so that only the client certificate can be the problem
    impostor = Client(other, "dev-a", running.port, ca_cert=layout.ca_cert)
    try:
        outcome = impostor.try_connect()
    finally:
        impostor.close()
    assert outcome != "connected" and outcome != "timeout", outcome
    genuine = Client(layout, "dev-a", running.port)
    try:
        assert genuine.try_connect() == "connected"
    finally:
        genuine.close()


def test_the_brokers_server_certificate_is_not_accepted_as_a_client_certificate(clients, layout):
    """extendedKeyUsage is enforced: a serverAuth-only certificate cannot log in as a client."""
    outcome = clients(None, cert_pair=(layout.server_cert, layout.server_key)).try_connect()
    assert outcome != "connected" and outcome != "timeout", outcome
