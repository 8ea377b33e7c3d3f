"""The device's connection for pulling models: a lean MQTT client for blob chunk streams.

Why not :class:`agent.mqtt.MqttLink` (paho): a model arrives as a few dozen messages of up to a
MiB, and paho copies each one six times on its way in (the socket read, the packet buffer, and
four ``struct.unpack`` slices in ``decode_publish``) before the fetch can hash it. Here one
``recv`` of up to 1 MiB, one join when a message spans reads, and one slice for the payload.
In interleaved pulls of 15 MB from a local mosquitto in 1 MiB chunks it took the Downloader
from 0.57x to 0.64x of raw broker throughput (``bench/mqtt_pull.py``; docs/benchmarks-mqtt.md).

It has what :class:`agent.transfer.Downloader` uses of a link and nothing else: ``subscribe``
(with a token to wait for the SUBACK, and the broker's refusal), ``unsubscribe``, ``publish``
(QoS 0/1 chunk requests), ``connected``, ``connect_info``, ``max_packet_size``, ``last_error``.

The connection exists only while something is subscribed: the first :meth:`subscribe` opens it,
the last :meth:`unsubscribe` sends DISCONNECT and closes it, so an idle device holds one
connection to the broker (its ``MqttLink``), and a downloading one two. Clean start, no session:
after a reconnect the Downloader asks again for what was in flight (``session_present`` is
always False). Mutual TLS with the device's files, so the broker's ACL sees the same identity as
on the main connection (``use_identity_as_username``; the client id, ``<device>.blob``, grants
nothing). MQTT 5 or 3.1.1, as the main link negotiated. Reconnects with exponential backoff and
full jitter. One thread reads and writes the socket (an ``ssl`` socket must not be read and
written from two threads); :meth:`publish` queues and wakes it.

Handlers run on the reader thread (the Downloader's only queues), and a QoS 1 message is
acknowledged once its handler has returned.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.mqtt import (Message, MqttError, NotConnected, TlsFiles, backoff_delay, broker_address, filter_matches,
                        open_socket, read_or_wake)
from agent.mqtt_wire import (DISCONNECT, PINGREQ, PROTOCOLS, MqttConnectRefused, PacketReader, ProtocolError,
                             connect_packet, decode_connack, decode_suback, puback_packets, publish_packet,
                             reason_text, subscribe_packet, unsubscribe_packet)

log = logging.getLogger("litefleet.blob_link")

READ_SIZE = 1 << 20        # one recv takes up to a whole 1 MiB chunk message
RECEIVE_BUFFER = 4 << 20   # the kernel may hold a window of chunks while the fetch hashes one


@dataclass(frozen=True)
class StreamConnectInfo:
    """What the Downloader reads after a (re)connect: never a resumed session."""

    protocol: str
    max_packet_size: int | None
    session_present: bool = False


class StreamSubscription:
    """Set once the broker granted the subscription on the current connection (cleared on a new
    one); ``refused`` names the broker's refusal."""

    def __init__(self) -> None:
        self._granted = threading.Event()
        self.refused: str | None = None

    def wait(self, timeout: float) -> bool:
        return self._granted.wait(timeout)


class _Filter:
    __slots__ = ("topic_filter", "handler", "qos", "token")

    def __init__(self, topic_filter: str, handler: Callable[[Message], None], qos: int) -> None:
        self.topic_filter = topic_filter
        self.handler = handler
        self.qos = qos
        self.token = StreamSubscription()


class BlobLink:
    """A connection that lives while a blob stream is subscribed (see the module docstring).

    ``protocol``: ``"5"``, ``"3.1.1"``, or a function returning one, asked at every connect (the
    device's main link, which negotiates with the broker, knows).
    """

    def __init__(self, url: str, client_id: str, *, tls: TlsFiles | None = None,
                 protocol: str | Callable[[], str] = "5", keepalive_s: int = 30,
                 backoff: tuple[float, float] = (0.2, 5.0), connect_timeout_s: float = 10.0) -> None:
        if not client_id:
            raise MqttError("an MQTT client id is required")
        self.host, self.port = broker_address(url, tls)
        if not 0 <= keepalive_s <= 65535:
            raise MqttError(f"keepalive_s {keepalive_s} must be 0..65535")
        if isinstance(protocol, str) and protocol not in PROTOCOLS:
            raise MqttError(f"protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
        self.url = url
        self.client_id = client_id
        self.tls = tls
        self._protocol = protocol
        self.keepalive_s = keepalive_s
        self.backoff = backoff
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()          # guards everything below that two threads touch
        self._filters: dict[str, _Filter] = {}
        self._pending_subs: dict[int, str] = {}    # SUBSCRIBE packet id -> filter
        self._outbox: list[bytes] = []
        self._next_id = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._info: StreamConnectInfo | None = None
        self._proto = "5"
        self._last_sent = 0.0
        self.last_error: str | None = None

    # -- what the Downloader reads ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connect_info(self) -> StreamConnectInfo | None:
        return self._info

    @property
    def max_packet_size(self) -> int | None:
        info = self._info
        return info.max_packet_size if info else None

    @property
    def protocol_version(self) -> str:
        return self._proto

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- API -----------------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1, *,
                  inline: bool = True) -> StreamSubscription:
        """Deliver messages on ``topic_filter`` to ``handler`` (on the reader thread: it must only
        queue). Opens the connection if none is open. ``inline`` is accepted for MqttLink's
        signature; handlers here always run inline."""
        if qos not in (0, 1):
            raise MqttError(f"qos {qos}: the blob link subscribes at QoS 0 or 1")
        entry = _Filter(topic_filter, handler, qos)
        with self._lock:
            self._filters[topic_filter] = entry
            if self._connected.is_set():
                self._outbox.append(self._subscribe_locked(entry))
        if self._thread is None:
            self._start()
        else:
            self._wake()
        return entry.token

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering ``topic_filter``; the last one closes the connection (DISCONNECT)."""
        with self._lock:
            if self._filters.pop(topic_filter, None) is None:
                return
            last = not self._filters
            if not last and self._connected.is_set():
                self._outbox.append(unsubscribe_packet(self._packet_id_locked(), [topic_filter], self._proto))
        if last:
            self.stop()
        else:
            self._wake()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, **_mqtt5: Any) -> None:
        """Queue a (small) message for the reader thread to send at once. Not kept across a
        reconnect: the Downloader asks again for what was in flight. ``retain`` and MQTT 5
        options are not supported (chunk requests need neither)."""
        if retain:
            raise MqttError("the blob link does not publish retained messages")
        with self._lock:
            if not self._connected.is_set():
                raise NotConnected(f"blob link {self.client_id} is not connected to {self.url} "
                                   f"({self.last_error or 'connecting'})")
            packet_id = self._packet_id_locked() if qos else 0
            self._outbox.append(publish_packet(topic, payload, qos=qos, packet_id=packet_id, protocol=self._proto))
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT, close the connection and end the reader thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("blob link %s: reader thread did not stop within %.1fs", self.client_id, timeout)
        self._thread = None

    # -- any thread -> reader thread ------------------------------------------------------------
    def _start(self) -> None:
        self._stopping.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, args=(self._wake_r, self._wake_w),
                                        name=f"blob-link:{self.client_id}", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is None:
            return
        try:
            wake.send(b"w")
        except OSError:   # full (the reader is due to wake anyway) or closed (it stopped)
            pass

    def _packet_id_locked(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def _subscribe_locked(self, entry: _Filter) -> bytes:
        packet_id = self._packet_id_locked()
        self._pending_subs[packet_id] = entry.topic_filter
        return subscribe_packet(packet_id, [entry.topic_filter], entry.qos, self._proto)

    # -- reader thread ------------------------------------------------------------------------------
    def _open(self) -> Any:
        return open_socket(self.host, self.port, self.tls, timeout_s=self.connect_timeout_s, receive_buffer=RECEIVE_BUFFER)

    def _run(self, wake_r: socket.socket, wake_w: socket.socket) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                protocol = self._protocol() if callable(self._protocol) else self._protocol
                self._proto = protocol if protocol in PROTOCOLS else "5"
                accepted = False
                try:
                    sock = self._open()
                except (OSError, ssl.SSLError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    try:
                        accepted, reason = self._serve(sock, wake_r)
                    except (OSError, ssl.SSLError) as exc:
                        reason = f"{type(exc).__name__}: {exc}"
                    except ProtocolError as exc:
                        reason = str(exc)
                    except Exception as exc:  # a bug here must not hang a fetch: log, reconnect
                        log.exception("blob link %s: unexpected error", self.client_id)
                        reason = f"{type(exc).__name__}: {exc}"
                    finally:
                        with self._lock:
                            accepted = accepted or self._connected.is_set()
                            self._connected.clear()
                            self._outbox.clear()
                            self._pending_subs.clear()
                            for entry in self._filters.values():
                                entry.token._granted.clear()
                        sock.close()
                if self._stopping.is_set():
                    break
                self.last_error = reason or "connection closed"
                if accepted:
                    attempt = 0
                    log.warning("blob link %s lost its connection to %s: %s", self.client_id, self.url, reason)
                else:
                    log.warning("blob link %s cannot connect to %s: %s (retrying with backoff)",
                                self.client_id, self.url, reason)
                self._stopping.wait(backoff_delay(attempt, *self.backoff))
                attempt += 1
        finally:
            self._connected.clear()
            with self._lock:
                if self._wake_w is wake_w:
                    self._wake_w = None
            wake_r.close()
            wake_w.close()

    def _flush(self, sock: Any, wake_r: socket.socket, *, send: bool = True) -> None:
        """Drain the wake-up pipe; send what is queued (not before CONNACK: nothing may precede it)."""
        try:
            while wake_r.recv(4096):
                pass
        except OSError:
            pass
        if not send:
            return
        with self._lock:
            if not self._outbox:
                return
            data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
            self._outbox.clear()
        sock.sendall(data)
        self._last_sent = time.monotonic()

    def _serve(self, sock: Any, wake_r: socket.socket) -> tuple[bool, str]:
        """Handshake, subscribe and read until the connection ends; (CONNACK accepted, why it ended)."""
        protocol = self._proto
        reader = PacketReader(protocol)
        sock.settimeout(self.connect_timeout_s)
        sock.sendall(connect_packet(self.client_id, clean_start=True, keepalive_s=self.keepalive_s,
                                    protocol=protocol))
        opened = self._last_sent = time.monotonic()
        last_received = opened
        keepalive = self.keepalive_s
        pinged = False
        accepted = False
        while True:
            if self._stopping.is_set():
                if accepted:
                    self._flush(sock, wake_r)
                    sock.sendall(DISCONNECT)
                return accepted, "stopped"
            tick = min(1.0, keepalive / 4) if keepalive else 1.0
            data = read_or_wake(sock, wake_r, READ_SIZE, tick, lambda: self._flush(sock, wake_r, send=accepted))
            now = time.monotonic()
            if data is not None:
                if not data:
                    return accepted, "the broker closed the connection"
                last_received = now
                pinged = False
                publishes, controls = reader.feed(data, 1)
                for first, body in controls:
                    kind = first >> 4
                    if kind == 2:                                   # CONNACK
                        keepalive = self._on_connack(body, protocol)
                        accepted = True
                        self._flush(sock, wake_r)                   # the SUBSCRIBEs
                    elif kind == 9:                                 # SUBACK
                        self._on_suback(body, protocol)
                    elif kind == 14:                                # DISCONNECT (MQTT 5)
                        return accepted, f"broker sent DISCONNECT{': reason 0x%02X' % body[0] if body else ''}"
                    elif kind not in (4, 11, 13):                   # PUBACK, UNSUBACK, PINGRESP: nothing to do
                        raise ProtocolError(f"unexpected packet type {kind} from the broker")
                if publishes:
                    if not accepted:
                        raise ProtocolError("PUBLISH before CONNACK")
                    self._deliver(publishes)
                    acks = [token & 0xFFFF for _, _, token in publishes if token]
                    if acks:
                        sock.sendall(puback_packets(acks))
                        self._last_sent = now
            if not accepted:
                if now - opened > self.connect_timeout_s:
                    return False, f"no CONNACK within {self.connect_timeout_s:g}s"
                continue
            if keepalive:
                if now - last_received > keepalive * 1.5:
                    return accepted, f"no packet from the broker for {now - last_received:.0f}s (keepalive)"
                if not pinged and (now - self._last_sent >= keepalive / 2 or now - last_received >= keepalive / 2):
                    sock.sendall(PINGREQ)
                    self._last_sent = now
                    pinged = True

    def _deliver(self, publishes: list[tuple[str, bytes, int]]) -> None:
        with self._lock:
            entries = list(self._filters.values())
        for topic, payload, token in publishes:
            message = Message(topic, payload, 1 if token else 0, False)
            for entry in entries:
                if entry.topic_filter == topic or filter_matches(entry.topic_filter, topic):
                    try:
                        entry.handler(message)
                    except Exception:   # one bad handler must not cost the connection
                        log.exception("blob link %s: handler for %s failed on a message on %s",
                                      self.client_id, entry.topic_filter, topic)

    def _on_connack(self, body: bytes, protocol: str) -> int:
        """Take the CONNACK; return the keepalive to keep (the broker's, if it set one)."""
        connack = decode_connack(body, protocol)
        if connack.code:
            if protocol == "5" and len(body) == 2 and connack.code == 1:
                raise MqttConnectRefused("broker refused MQTT 5 (it answered as an MQTT 3.1.1 broker)")
            raise MqttConnectRefused(f"broker refused the connection: {connack.refusal(protocol)}")
        with self._lock:
            self._info = StreamConnectInfo(protocol, connack.max_packet_size)
            for entry in self._filters.values():
                self._outbox.append(self._subscribe_locked(entry))
            self._connected.set()
        self.last_error = None
        log.debug("blob link %s connected to %s (MQTT %s)", self.client_id, self.url, protocol)
        return self.keepalive_s if connack.server_keepalive_s is None else connack.server_keepalive_s

    def _on_suback(self, body: bytes, protocol: str) -> None:
        packet_id, codes = decode_suback(body, protocol)
        with self._lock:
            topic_filter = self._pending_subs.pop(packet_id, None)
            entry = self._filters.get(topic_filter) if topic_filter is not None else None
        if entry is None:
            return   # unsubscribed meanwhile
        token = entry.token
        if not codes or codes[0] >= 0x80:
            token.refused = (f"broker refused the subscription to {topic_filter} "
                             f"({reason_text(codes[0]) if codes else 'no reason code'})")
            self.last_error = token.refused
            log.warning("blob link %s: %s", self.client_id, token.refused)
            return
        token.refused = None
        token._granted.set()


__all__ = ["BlobLink", "StreamConnectInfo", "StreamSubscription"]
