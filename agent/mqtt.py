"""The one module that owns paho-mqtt: a typed, reconnecting MQTT link.

Why a wrapper: the rest of litefleet must not care about paho's callback API, its error codes,
or whether the broker speaks MQTT 5 or 3.1.1. ``MqttLink`` gives

- one network thread that reconnects forever with exponential backoff and *full jitter*
  (paho's own ``reconnect_delay_set`` has no jitter, so a fleet would reconnect in lockstep
  after a broker restart);
- handlers that run on a worker thread per subscription, never on the network thread, so a
  slow handler cannot stall keepalive, acks, or another subscription;
- subscriptions remembered and re-sent on every (re)connect;
- QoS 1 publishes queued while disconnected and sent after reconnect (paho keeps them);
- MQTT 5 features (message expiry, response topic, correlation data, receive maximum,
  maximum packet size, session expiry) when negotiated, silently absent on 3.1.1;
- optional manual acknowledgement (``manual_ack=True``): a QoS 1 message is acknowledged only
  when the application calls :meth:`MqttLink.ack` (e.g. after its database commit), so a crash
  between arrival and commit loses nothing: the broker redelivers it to the persistent session.

No paho type crosses this module's boundary.
"""

from __future__ import annotations

import logging
import queue
import random
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.errors import LitefleetError

log = logging.getLogger("litefleet.mqtt")

_PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
# CONNACK codes meaning "I do not speak this protocol version": v3 code 1, v5 0x84.
_BAD_PROTOCOL_CODES = {1, 0x84}


class MqttError(LitefleetError):
    """Base of the MQTT link's errors."""


class NotConnected(MqttError):
    """A QoS 0 message cannot be sent (or queued) because the link is down."""


class PacketTooLarge(MqttError):
    """The message exceeds the maximum packet size the broker announced in CONNACK."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA that signed the broker, and this client's identity."""

    ca_file: str
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Will:
    """The message the broker publishes when this client vanishes without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Message:
    """A received message. ``properties`` holds the MQTT 5 extras that were present:
    ``response_topic`` (str), ``correlation_data`` (bytes), ``message_expiry`` (int, seconds left)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict = field(default_factory=dict)
    mid: int = 0          # packet id (QoS >= 1), for MqttLink.ack with manual_ack=True
    connection: int = 0   # which connection of the link it arrived on (a mid is only valid there)


@dataclass(frozen=True)
class ConnectInfo:
    """What a successful CONNACK told us. ``None`` means the broker did not announce a limit."""

    session_present: bool
    protocol: str
    max_packet_size: int | None
    receive_maximum: int | None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): full jitter, uniform(0, min(cap, base*2**n)).

    Full jitter spreads a fleet's reconnects over the whole window instead of synchronising them.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError(f"backoff needs attempt, base and cap >= 0 (got {attempt}, {base}, {cap})")
    ceiling = min(cap, base * 2.0 ** min(attempt, 60))
    return (rng or random).uniform(0.0, ceiling)


def _no_delay(sock: Any) -> None:
    """Send small packets (requests, acks) at once: with Nagle's algorithm each waited ~40 ms
    for the previous one's ACK, which made a windowed chunk pull 6x slower than the broker."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def open_socket(host: str, port: int, tls: TlsFiles | None, *, timeout_s: float, receive_buffer: int) -> Any:
    """A connected socket for the lean links that bypass paho (fleet/ingest_link.py,
    agent/blob_link.py): TCP_NODELAY, a receive buffer of ``receive_buffer`` bytes, and mutual
    TLS with ``tls`` when given (the broker's certificate checked against ``tls.ca_file``)."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            sock = context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def read_or_wake(sock: Any, wake: socket.socket, size: int, timeout: float, on_wake: Callable[[], None]) -> bytes | None:
    """One read of a lean link's loop: bytes an ssl socket already decrypted first, else wait up to
    ``timeout`` for the socket or the link's wake-up socket (``on_wake`` runs for the latter).
    None when nothing arrived, ``b""`` when the broker closed the connection."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return sock.recv(size)
    readable, _, _ = select.select((sock, wake), (), (), timeout)
    if wake in readable:
        on_wake()
    if sock not in readable:
        return None
    try:
        return sock.recv(size)
    except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
        return None


def broker_address(url: str, tls: TlsFiles | None) -> tuple[str, int]:
    """(host, port) of ``url``, refusing a TLS url without TLS files and TLS files with a plain url."""
    host, port, use_tls = parse_url(url)
    if use_tls and tls is None:
        raise MqttError(f"{url}: mqtts:// needs TLS files (ca_file, cert_file, key_file)")
    if tls is not None and not use_tls:
        raise MqttError(f"{url}: TLS files given but the url is not mqtts://")
    return host, port


def parse_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise MqttError(f"broker url {url!r} must look like mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise MqttError(f"broker url {url!r}: bad port ({exc})") from None
    return parts.hostname, port, tls


def filter_matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):  # $share/{group}/{filter}
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    try:
        return paho.topic_matches_sub(topic_filter, topic)
    except ValueError:
        return False


class PublishToken:
    """Completion of one publish: acked by the broker (QoS >= 1) or written to the socket (QoS 0)."""

    def __init__(self, info: "paho.MQTTMessageInfo | None", link: "MqttLink | None" = None) -> None:
        self._info = info
        self._link = link

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True once the broker acknowledged (False on timeout)."""
        info = self._info
        if info is None:
            return False
        # MQTTMessageInfo.wait_for_publish raises when the first send found no connection, even
        # though paho keeps QoS >= 1 messages and sends them after reconnect; wait on its condition.
        with info._condition:
            return info._condition.wait_for(lambda: info._published, timeout)

    @property
    def acked(self) -> bool:
        info = self._info
        if info is None:
            return False
        with info._condition:
            return bool(info._published)

    @property
    def refused(self) -> str | None:
        """The MQTT 5 PUBACK failure reason (e.g. 'Not authorized'), if the broker refused it."""
        if self._link is None or self._info is None:
            return None
        return self._link._refusals.get(id(self._info), (None, None))[1]


class SubscribeToken:
    """Completion of a subscription on the current connection (the broker's SUBACK)."""

    def __init__(self, worker: "_Worker") -> None:
        self._worker = worker

    def wait(self, timeout: float) -> bool:
        """True once the broker granted the subscription; False on timeout or refusal."""
        return self._worker.subscribed.wait(timeout) and self._worker.refused is None

    @property
    def refused(self) -> str | None:
        """Why the broker refused the subscription (e.g. 'Not authorized'), if it did."""
        return self._worker.refused


class _BufferedSocket:
    """The link's socket with a read buffer, so paho's reads cost no system call each.

    paho reads every packet with three or more ``recv()`` calls (the command byte, the length
    byte by byte, the body) and one ``select()``: at ~1 KB telemetry messages that capped a
    subscriber near 4k msgs/s on this machine. Here one ``recv(64 KiB)`` serves many packets;
    ``pending()`` (which paho already honours for TLS sockets) tells its loop not to wait in
    ``select()`` while bytes are buffered.
    """

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._sock.recv(max(n, 65536))  # BlockingIOError / SSLWantReadError when empty
            if not buf:
                return buf
            self._buf = buf
            pos = 0
        out = buf[pos:pos + n]
        self._pos = pos + len(out)
        return out

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered() or (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Worker:
    """One subscription's handler and the thread that runs it off the network thread.

    ``inline``: no thread; the handler runs on the network thread as each message arrives.
    Only for handlers that do next to nothing (append to a list): it saves a queue hand-off
    and a thread switch per message, but a slow inline handler stalls the whole link.
    """

    _STOP = object()

    def __init__(self, topic_filter: str, handler: Callable[[Message], None], qos: int,
                 inline: bool = False) -> None:
        self.topic_filter = topic_filter
        self.handler = handler
        self.qos = qos
        self.inline = inline
        self.subscribed = threading.Event()  # SUBACK seen on the current connection
        self.refused: str | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"mqtt-handler:{topic_filter}", daemon=True)
        if inline:
            self.queue = _InlineQueue(self)  # type: ignore[assignment]
        else:
            self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._STOP:
                return
            try:
                self.handler(item)
            except Exception:  # one bad message must not kill the link
                log.exception("handler for %s failed on a message on %s; message dropped",
                              self.topic_filter, item.topic)

    def stop(self, timeout: float) -> None:
        if self.inline:
            return
        self.queue.put(self._STOP)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.inline or self.thread.is_alive()


class _InlineQueue:
    """Stands in for an inline worker's queue: ``put`` runs the handler at once."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def put(self, message: Message) -> None:
        try:
            self.worker.handler(message)
        except Exception:  # one bad message must not kill the link
            log.exception("inline handler for %s failed on a message on %s; message dropped",
                          self.worker.topic_filter, message.topic)


class MqttLink:
    """A persistent, self-reconnecting MQTT connection (see the module docstring)."""

    _UNMATCHED_LIMIT = 10_000
    _ROUTES_LIMIT = 100_000

    def __init__(self, url: str, client_id: str, *, tls: TlsFiles | None = None, protocol: str = "auto",
                 clean_start: bool = False, session_expiry_s: int = 7 * 86400, keepalive_s: int = 30,
                 will: Will | None = None, receive_maximum: int = 65535, max_inflight: int = 20,
                 backoff: tuple[float, float] = (0.5, 60.0), manual_ack: bool = False,
                 on_connect: Callable[[ConnectInfo], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None) -> None:
        if not client_id:
            raise MqttError("an MQTT client id is required (the broker keeps the session under it)")
        if protocol not in ("5", "3.1.1", "auto"):
            raise MqttError(f"protocol {protocol!r} must be '5', '3.1.1' or 'auto'")
        self.host, self.port = broker_address(url, tls)
        self.url = url
        self.client_id = client_id
        self._requested = protocol
        self._proto = "5" if protocol in ("5", "auto") else "3.1.1"
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._receive_maximum = receive_maximum
        self._max_inflight = max_inflight
        self._backoff = backoff
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect

        self._lock = threading.RLock()
        self._workers: dict[str, _Worker] = {}
        self._unmatched: list[Message] = []  # arrived before a matching subscribe() (resumed session)
        self._dropped_unmatched = 0
        self._pending_subs: dict[int, list[str]] = {}  # SUBSCRIBE mid -> filters
        self._refusals: dict[int, tuple[object, str]] = {}
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: _Worker | None = None
        self._info: ConnectInfo | None = None
        self._ever_connected = False
        self._disconnect_requested = False
        self.last_error: str | None = None
        self._last_connack_bad_protocol: bool | None = None  # None: no CONNACK seen this attempt
        self._loop_reason = ""
        self.manual_ack = manual_ack
        self._connection = 0  # incremented on every successful CONNACK
        self._routes: dict[str, list[_Worker]] = {}  # topic -> matching workers (cleared on (un)subscribe)

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=_PROTOCOLS[self._proto],
                             clean_session=None if self._proto == "5" else clean_start,
                             reconnect_on_failure=False, manual_ack=manual_ack)
        if tls is not None:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # unlimited: never drop a QoS 1 message on our side
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        # With a callback here, publish() from any thread only queues the packet and wakes our
        # loop() through paho's socketpair; only the network thread ever writes the socket.
        client.on_socket_register_write = lambda _client, _userdata, _sock: None
        self._client = client

    # -- properties -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol_version(self) -> str:
        """"5" or "3.1.1": the protocol of the current (or next) connection."""
        return self._proto

    @property
    def max_packet_size(self) -> int | None:
        info = self._info
        return info.max_packet_size if info else None

    @property
    def connect_info(self) -> ConnectInfo | None:
        return self._info

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the network thread; it connects and keeps reconnecting in the background."""
        if self._thread is not None:
            return
        self._stopping.clear()
        with self._lock:  # a link started again after stop(): its subscriptions need live workers
            for name, worker in list(self._workers.items()):
                if not worker.alive():
                    self._workers[name] = _Worker(name, worker.handler, worker.qos, worker.inline)
        self._events = _Worker("(connection events)", lambda call: call(), 0)
        self._thread = threading.Thread(target=self._run, name=f"mqtt-net:{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly (the broker discards the will) and join every thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._connected.is_set():
            self._disconnect_requested = True
            self._client.disconnect()  # queued; the network thread writes it, then the loop ends
        thread.join(timeout)
        if thread.is_alive():
            log.warning("MQTT network thread for %s did not stop within %.1fs", self.client_id, timeout)
        self._thread = None
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop(timeout)
        if self._events is not None:
            self._events.stop(timeout)
            self._events = None
        self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def __enter__(self) -> "MqttLink":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- subscribe / publish --------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1, *,
                  inline: bool = False) -> SubscribeToken:
        """Run ``handler`` for every message matching ``topic_filter``, now and after every reconnect.

        ``inline=True`` runs it on the network thread (no queue, no thread switch): only for a
        handler that returns at once, e.g. one appending to a batch another thread writes.

        The token's ``wait()`` tells when the broker has the subscription: wait on it before asking
        *another* client to publish (messages published on this link after subscribe() are ordered).
        """
        topic_filter = str(topic_filter)
        with self._lock:
            old = self._workers.get(topic_filter)
            if old is not None and old.inline == inline:
                old.handler = handler
                old.qos = qos
                worker = old
            else:
                if old is not None:
                    old.stop(0)
                worker = self._workers[topic_filter] = _Worker(topic_filter, handler, qos, inline)
            worker.subscribed.clear()
            worker.refused = None
            self._routes.clear()
            # Messages that arrived (e.g. a resumed session's queue) before this subscribe().
            kept = []
            for message in self._unmatched:
                (worker.queue.put(message) if filter_matches(topic_filter, message.topic) else kept.append(message))
            self._unmatched = kept
            if self._connected.is_set():  # under the lock, so on_subscribe finds the mid
                _rc, mid = self._client.subscribe(topic_filter, qos=qos)
                self._pending_subs[mid] = [topic_filter]
        return SubscribeToken(worker)

    def unsubscribe(self, topic_filter: str) -> None:
        topic_filter = str(topic_filter)
        with self._lock:
            worker = self._workers.pop(topic_filter, None)
            self._routes.clear()
        if worker is not None:
            worker.stop(0)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                expiry_s: int | None = None, response_topic: str | None = None,
                correlation: bytes | None = None) -> PublishToken:
        """Publish; QoS >= 1 messages are queued while disconnected and sent after reconnect.

        The MQTT 5 options are dropped on a 3.1.1 connection (put what must arrive in the payload).
        Raises NotConnected for QoS 0 while down, PacketTooLarge above the broker's limit.
        """
        topic = str(topic)
        if qos == 0 and not self._connected.is_set():
            raise NotConnected(f"cannot send QoS 0 message on {topic}: not connected to {self.url}")
        properties = None
        if self._proto == "5" and (expiry_s is not None or response_topic or correlation is not None):
            properties = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                properties.MessageExpiryInterval = int(expiry_s)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = bytes(correlation)
        limit = self.max_packet_size
        if limit is not None:
            size = self._packet_size(topic, payload, qos, properties)
            if size > limit:
                raise PacketTooLarge(f"message on {topic} is {size} bytes; the broker at {self.url} "
                                     f"accepts at most {limit} (use smaller chunks)")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:
            raise MqttError(f"cannot publish on {topic!r}: {exc}") from None
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"cannot publish on {topic}: outgoing queue full")
        if qos == 0 and info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"cannot send QoS 0 message on {topic}: {paho.error_string(info.rc)}")
        return PublishToken(info, self)

    def ack(self, messages: "Iterable[Message]") -> int:
        """Acknowledge QoS >= 1 messages received with ``manual_ack=True``; the number acked.

        Call it once the messages are safe (committed). A message that arrived on an earlier
        connection is skipped: its packet id means nothing on this one, and the broker resends it
        on the resumed session anyway (the application sees it again and must dedupe). Without
        ``manual_ack`` paho already acked on arrival and this does nothing.
        """
        if not self.manual_ack or not self._connected.is_set():
            return 0
        current = self._connection
        client = self._client
        done = 0
        for m in messages:
            if m.qos and m.connection == current:
                client.ack(m.mid, m.qos)
                done += 1
        return done

    def clear_retained(self, topic: str) -> PublishToken:
        """Delete the retained message on ``topic`` (an empty retained publish)."""
        return self.publish(topic, b"", qos=1, retain=True)

    @staticmethod
    def _packet_size(topic: str, payload: bytes, qos: int, properties: Properties | None) -> int:
        props = len(properties.pack()) if properties is not None else 1
        remaining = 2 + len(topic.encode()) + (2 if qos else 0) + props + len(payload)
        header = 2 + (remaining >= 128) + (remaining >= 16384) + (remaining >= 2097152)
        return header + remaining

    # -- network thread -------------------------------------------------------------------------
    def _connect_properties(self) -> Properties | None:
        if self._proto != "5":
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(self._session_expiry_s)
        props.ReceiveMaximum = int(self._receive_maximum)
        return props

    def _set_protocol(self, proto: str) -> None:
        # paho fixes the protocol at construction; switching in place (as paho's own v3.1
        # downgrade does) keeps the QoS 1 messages queued in this client.
        self._proto = proto
        self._client._protocol = _PROTOCOLS[proto]
        if proto != "5":
            self._client._clean_session = self._clean_start

    def _run(self) -> None:
        client = self._client
        attempt = 0
        failures = 0
        while not self._stopping.is_set():
            client.connect_async(self.host, self.port, keepalive=self._keepalive_s,
                                 clean_start=self._clean_start if self._proto == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                 properties=self._connect_properties())
            opened = False
            reason = ""
            try:
                client.reconnect()
                _no_delay(client.socket())
                if client._sock is not None:  # paho keeps it there; see _BufferedSocket
                    client._sock = _BufferedSocket(client._sock)
                opened = True
                reason = self._pump()
            except (OSError, ssl.SSLError, socket.timeout) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # paho choking on a broken reply must not kill the link
                reason = f"{type(exc).__name__}: {exc}"
                log.debug("MQTT loop error", exc_info=True)
                client._sock_close()
            was_connected = self._connected.is_set()
            self._connected.clear()
            with self._lock:
                self._pending_subs.clear()
                for worker in self._workers.values():
                    worker.subscribed.clear()
            if self._stopping.is_set():
                break
            if was_connected:
                attempt = 0
                failures = 0
                log.warning("MQTT %s lost connection to %s: %s", self.client_id, self.url, reason)
                self._emit_disconnect(reason)
            else:
                self.last_error = reason or self.last_error
                if failures == 0:
                    log.warning("MQTT %s cannot connect to %s: %s (retrying with backoff)",
                                self.client_id, self.url, self.last_error)
                else:
                    log.debug("MQTT %s connect attempt %d failed: %s", self.client_id, failures + 1, reason)
                failures += 1
                if (self._requested == "auto" and not self._ever_connected and opened
                        and self._last_connack_bad_protocol is not False):
                    other = "3.1.1" if self._proto == "5" else "5"
                    log.info("MQTT %s: broker at %s refused MQTT %s; trying %s", self.client_id,
                             self.url, self._proto, other)
                    self._set_protocol(other)
                    if other == "3.1.1":
                        continue  # a protocol switch is not a failure: retry at once
            delay = backoff_delay(attempt, *self._backoff)
            attempt += 1
            self._stopping.wait(delay)
        self._connected.clear()

    def _pump(self) -> str:
        """Run paho's loop until the connection ends; return why it ended."""
        client = self._client
        self._last_connack_bad_protocol = None
        self._loop_reason = ""
        self._disconnect_requested = False
        while True:
            rc = client.loop(timeout=0.5)
            # Handle every packet already buffered before the next select() (bounded, so
            # keepalive and writes in loop() still run under a flood).
            sock = client._sock
            budget = 2000
            while rc == paho.MQTT_ERR_SUCCESS and budget and sock is not None and sock is client._sock \
                    and isinstance(sock, _BufferedSocket) and sock.buffered():
                rc = client.loop_read()
                budget -= 1
            if rc != paho.MQTT_ERR_SUCCESS:
                if self._stopping.is_set() and rc == paho.MQTT_ERR_NO_CONN:
                    return "stopped"
                return self._loop_reason or paho.error_string(rc)
            if self._stopping.is_set():
                if not self._connected.is_set():
                    client._sock_close()
                    return "stopped"
                if not self._disconnect_requested:  # stop() raced with a CONNACK: disconnect here
                    self._disconnect_requested = True
                    client.disconnect()

    # -- paho callbacks (network thread: never block here) ----------------------------------------
    def _paho_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._last_connack_bad_protocol = reason_code.value in _BAD_PROTOCOL_CODES
            self._loop_reason = f"broker refused the connection: {reason_code}"
            self.last_error = self._loop_reason
            return
        self._last_connack_bad_protocol = False
        max_packet = getattr(properties, "MaximumPacketSize", None) if self._proto == "5" else None
        server_rm = getattr(properties, "ReceiveMaximum", None) if self._proto == "5" else None
        if server_rm:
            # MQTT 5: never have more unacked QoS>0 messages out than the broker's Receive Maximum.
            # paho neither does this nor allows max_inflight_messages_set() once connected; this
            # runs before paho resends queued messages, so setting the field here takes effect.
            with client._out_message_mutex:
                client._max_inflight_messages = min(self._max_inflight, server_rm) if self._max_inflight else server_rm
        else:
            with client._out_message_mutex:
                client._max_inflight_messages = self._max_inflight
        info = ConnectInfo(session_present=bool(flags.session_present), protocol=self._proto,
                           max_packet_size=max_packet, receive_maximum=server_rm)
        self._info = info
        self._connection += 1
        self._ever_connected = True
        self.last_error = None
        with self._lock:
            subscriptions = [(w.topic_filter, w.qos) for w in self._workers.values()]
            for worker in self._workers.values():
                worker.subscribed.clear()
            if subscriptions:
                _rc, mid = client.subscribe(subscriptions)
                self._pending_subs[mid] = [name for name, _qos in subscriptions]
        log.info("MQTT %s connected to %s (MQTT %s, session %s)", self.client_id, self.url,
                 self._proto, "resumed" if info.session_present else "new")
        self._connected.set()
        if self._on_connect_cb is not None and self._events is not None:
            callback = self._on_connect_cb
            self._events.queue.put(_Call(callback, info))

    def _paho_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # A refused CONNACK already said why; paho then reports a generic error here.
        if not self._loop_reason and (flags.is_disconnect_packet_from_server or reason_code.is_failure):
            self._loop_reason = f"{'broker sent DISCONNECT: ' if flags.is_disconnect_packet_from_server else ''}{reason_code}"

    def _emit_disconnect(self, reason: str) -> None:
        if self._on_disconnect_cb is not None and self._events is not None:
            self._events.queue.put(_Call(self._on_disconnect_cb, reason))

    def _paho_message(self, client, userdata, msg) -> None:
        props: dict = {}
        p = msg.properties
        if p is not None:
            for attr, key in (("ResponseTopic", "response_topic"), ("CorrelationData", "correlation_data"),
                              ("MessageExpiryInterval", "message_expiry")):
                value = getattr(p, attr, None)
                if value is not None:
                    props[key] = value
        payload = msg.payload
        message = Message(msg.topic, payload if payload.__class__ is bytes else bytes(payload), msg.qos,
                          bool(msg.retain), props, msg.mid, self._connection)
        with self._lock:
            # Matching a topic against every filter costs ~10 us each; a fleet's topics repeat.
            workers = self._routes.get(message.topic)
            if workers is None:
                workers = [w for w in self._workers.values() if filter_matches(w.topic_filter, message.topic)]
                if len(self._routes) >= self._ROUTES_LIMIT:
                    self._routes.clear()
                self._routes[message.topic] = workers
            for worker in workers:
                worker.queue.put(message)
            if not workers:
                if len(self._unmatched) >= self._UNMATCHED_LIMIT:
                    dropped = self._unmatched.pop(0)
                    (log.debug if self._dropped_unmatched else log.warning)(
                        "MQTT %s: dropping message on %s: no subscription handles it", self.client_id, dropped.topic)
                    self._dropped_unmatched += 1
                self._unmatched.append(message)

    def _paho_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            names = self._pending_subs.pop(mid, [])
            for name, code in zip(names, reason_codes):
                worker = self._workers.get(name)
                if worker is None:
                    continue
                worker.refused = str(code) if code.is_failure else None
                if code.is_failure:
                    log.warning("MQTT %s: broker refused subscription %s: %s", self.client_id, name, code)
                worker.subscribed.set()

    def _paho_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            message = client._out_messages.get(mid)
            if message is not None:
                if len(self._refusals) > 1000:
                    self._refusals.pop(next(iter(self._refusals)))
                self._refusals[id(message.info)] = (message.info, str(reason_code))
            log.warning("MQTT %s: broker refused message %d: %s", self.client_id, mid, reason_code)


class _Call:
    """A deferred user callback, run on the events worker (never on the network thread)."""

    def __init__(self, function: Callable, argument: object) -> None:
        self.function = function
        self.argument = argument
        self.topic = "(connection event)"

    def __call__(self) -> None:
        self.function(self.argument)
