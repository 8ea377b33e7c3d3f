"""A receive-only MQTT 5 client for telemetry ingest: connect, subscribe, read PUBLISH packets
in bulk, acknowledge after commit.

Why not :class:`agent.mqtt.MqttLink` (paho) here: ingest is the one place where the per-message
cost of the MQTT client is the limit. paho builds an MQTT 5 ``Properties`` object, a message
object and a callback dispatch for every PUBLISH: about a third of the ingest CPU, 33 µs per
message against this link's 7 (``bench/ingest_scale.py --link-cost``). This link does one ``recv`` of up to 256 KiB, slices topic, payload
and packet id out of the buffer, skips the properties block by its length, and hands the
ingestor a list of ``(topic, payload, ack_token)`` per read. The acknowledgements of a committed
batch leave in one ``sendall``.

What it keeps from the general link: mqtt:// or mqtts:// (mutual TLS with the same files),
a persistent session (fixed client id, ``clean_start=False``, session expiry) so a killed
process's unacknowledged messages are delivered again, the MQTT 5 Receive Maximum that bounds
how many unacknowledged messages the broker sends, keepalive pings, and reconnects with
exponential backoff and full jitter. QoS 0 and 1 only (the ingest filters are subscribed at
QoS <= 1, so the broker never sends QoS 2). MQTT 5 only: the Receive Maximum is what bounds
the ingestor's memory while the database is away (fleet/ingest.py), and 3.1.1 has none.

``ack_token`` is ``connection << 16 | packet_id`` for QoS 1 (0 for QoS 0): a packet id means
something only on the connection it arrived on. After a reconnect the broker resends the
unacknowledged messages with DUP set and new ids, so :meth:`IngestLink.ack` skips tokens of an
earlier connection instead of acknowledging a different message by accident.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from agent.mqtt import MqttError, TlsFiles, backoff_delay, broker_address, open_socket, read_or_wake
from agent.mqtt_wire import (DISCONNECT, PINGREQ, MqttConnectRefused, PacketReader, ProtocolError, Publish,
                             connect_packet, decode_connack, decode_suback, puback_packets, reason_text,
                             subscribe_packet)

log = logging.getLogger("litefleet.ingest_link")

BatchHandler = Callable[[list[Publish]], None]

READ_SIZE = 256 * 1024


# ----------------------------------------------------------------------------- the link

class SubscribeToken:
    """Set while the broker has granted the link's subscriptions on the current connection."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class IngestLink:
    """A persistent MQTT 5 session that only receives (see the module docstring).

    Call :meth:`subscribe_batches` once, then :meth:`start`; the handler runs on the link's
    reader thread with every PUBLISH of one read. Messages are acknowledged only by
    :meth:`ack` (after the caller's commit).

    Only the reader thread touches the socket: :meth:`ack` queues its PUBACKs and wakes it
    through a socket pair. (An ``ssl`` socket must not be read in one thread while another
    writes it; one writer also keeps packets whole without a lock around ``sendall``.)
    """

    def __init__(self, url: str, client_id: str, *, tls: TlsFiles | None = None, username: str | None = None,
                 password: str | None = None, clean_start: bool = False, session_expiry_s: int = 7 * 86400,
                 keepalive_s: int = 30, receive_maximum: int = 65535, backoff: tuple[float, float] = (0.2, 5.0),
                 connect_timeout_s: float = 10.0, read_size: int = READ_SIZE) -> None:
        if not client_id:
            raise MqttError("an MQTT client id is required (the broker keeps the session under it)")
        if not 0 < receive_maximum <= 65535:
            raise MqttError(f"receive_maximum {receive_maximum} must be 1..65535")
        if not 0 <= keepalive_s <= 65535:
            raise MqttError(f"keepalive_s {keepalive_s} must be 0..65535")
        self.host, self.port = broker_address(url, tls)
        self.url = url
        self.client_id = client_id
        self.tls = tls
        self._connect = connect_packet(client_id, clean_start=clean_start, keepalive_s=keepalive_s,
                                       session_expiry_s=session_expiry_s, receive_maximum=receive_maximum,
                                       username=username, password=password)
        self.keepalive_s = keepalive_s
        self.backoff = backoff
        self.connect_timeout_s = connect_timeout_s
        self.read_size = read_size
        self._filters: list[str] = []
        self._qos = 1
        self._on_batch: BatchHandler | None = None
        self._lock = threading.Lock()          # guards _outbox, _connection, _woken
        self._outbox: list[bytes] = []         # packets for the current connection, sent by the reader
        self._woken = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection = 0                   # incremented for every connection opened
        self._sub_id = 0
        self._last_sent = 0.0
        self.last_error: str | None = None
        self.session_present = False

    # -- properties ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connection(self) -> int:
        """Which connection is current (1 for the first one opened); ack tokens carry it."""
        return self._connection

    # -- API ----------------------------------------------------------------------------------
    def subscribe_batches(self, filters: Sequence[str], on_batch: BatchHandler, qos: int = 1) -> SubscribeToken:
        """Subscribe ``filters`` (on every connection) and deliver their messages to ``on_batch``."""
        if qos not in (0, 1):
            raise MqttError(f"qos {qos}: the ingest link handles QoS 0 and 1 only")
        if not filters:
            raise MqttError("at least one topic filter is needed")
        self._filters = list(filters)
        self._qos = qos
        self._on_batch = on_batch
        if self._connected.is_set():
            self._queue(self._connection, self._subscribe_packet())
        return SubscribeToken(self._subscribed)

    def start(self) -> None:
        """Start the reader thread; it connects and keeps reconnecting in the background."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"ingest-link:{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send DISCONNECT (the session stays: unacknowledged messages wait in the broker) and join."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("ingest link %s: reader thread did not stop within %.1fs", self.client_id, timeout)
        self._thread = None

    def close(self) -> None:
        """Stop, and release the wake-up socket pair (the link cannot be started again)."""
        self.stop()
        self._wake_r.close()
        self._wake_w.close()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def ack(self, tokens: Iterable[int]) -> int:
        """Acknowledge QoS 1 messages by their tokens; the number queued for this connection.

        The PUBACKs leave in one write as soon as the reader thread wakes. Tokens of an earlier
        connection (and QoS 0's 0) are skipped: the broker resends those messages on the resumed
        session, and the store drops the duplicates. If the connection ends before the write,
        the messages also come again.
        """
        connection = self._connection
        ids = [t & 0xFFFF for t in tokens if t >> 16 == connection]
        if not ids or not self._queue(connection, puback_packets(ids)):
            return 0
        return len(ids)

    # -- any thread -> reader thread ---------------------------------------------------------------
    def _queue(self, connection: int, packet: bytes) -> bool:
        with self._lock:
            if connection != self._connection or not self._connected.is_set():
                return False
            self._outbox.append(packet)
            wake = not self._woken
            self._woken = True
        if wake:
            self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):   # full: the reader is already due to wake
            pass

    def _subscribe_packet(self) -> bytes:
        self._sub_id = self._sub_id % 65535 + 1
        return subscribe_packet(self._sub_id, self._filters, self._qos)

    # -- reader thread --------------------------------------------------------------------------
    def _open(self) -> Any:
        return open_socket(self.host, self.port, self.tls, timeout_s=self.connect_timeout_s, receive_buffer=1 << 20)

    def _run(self) -> None:
        attempt = 0
        failures = 0
        while not self._stopping.is_set():
            reason = ""
            accepted = False
            try:
                sock = self._open()
            except (OSError, ssl.SSLError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                try:
                    accepted, reason = self._serve(sock)
                except (OSError, ssl.SSLError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                except ProtocolError as exc:
                    reason = str(exc)
                except Exception as exc:  # a bug here must not end ingest: log it and reconnect
                    log.exception("ingest link %s: unexpected error", self.client_id)
                    reason = f"{type(exc).__name__}: {exc}"
                finally:
                    accepted = accepted or self._connected.is_set()
                    with self._lock:
                        self._connected.clear()
                        self._subscribed.clear()
                        self._outbox.clear()      # acks of this connection mean nothing on the next
                    sock.close()
            if self._stopping.is_set():
                break
            if accepted:
                attempt = failures = 0
                log.warning("ingest link %s lost its connection to %s: %s", self.client_id, self.url, reason)
            elif failures == 0:
                log.warning("ingest link %s cannot connect to %s: %s (retrying with backoff)",
                            self.client_id, self.url, reason)
            else:
                log.debug("ingest link %s: connect attempt %d failed: %s", self.client_id, failures + 1, reason)
            if not accepted:
                failures += 1
            self.last_error = reason or "connection closed"
            self._stopping.wait(backoff_delay(attempt, *self.backoff))
            attempt += 1
        self._connected.clear()

    def _flush(self, sock: Any) -> None:
        """Send what :meth:`ack` and :meth:`subscribe_batches` queued for this connection."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            self._woken = False
            if not self._outbox:
                return
            data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
            self._outbox.clear()
        sock.sendall(data)
        self._last_sent = time.monotonic()

    def _serve(self, sock: Any) -> tuple[bool, str]:
        """Handshake, subscribe and read until the connection ends; (CONNACK accepted, why it ended)."""
        reader = PacketReader()
        with self._lock:
            # numbered before CONNECT: the CONNACK and the first PUBLISHes may come in one read
            self._connection += 1
            self._outbox.clear()
        sock.settimeout(self.connect_timeout_s)
        sock.sendall(self._connect)
        opened = self._last_sent = time.monotonic()
        last_received = opened
        pinged = False
        accepted = False
        tick = min(1.0, self.keepalive_s / 4) if self.keepalive_s else 1.0
        wake = self._wake_r
        size = self.read_size

        def flush() -> None:
            self._flush(sock)
        while True:
            if self._stopping.is_set():
                if accepted:
                    self._flush(sock)
                    sock.sendall(DISCONNECT)
                return accepted, "stopped"
            data = read_or_wake(sock, wake, size, tick, flush)
            now = time.monotonic()
            if data is not None:
                if not data:
                    return accepted, "the broker closed the connection"
                last_received = now
                pinged = False
                publishes, controls = reader.feed(data, self._connection)
                for first, body in controls:
                    kind = first >> 4
                    if kind == 2:                             # CONNACK
                        self._on_connack(body)
                        accepted = True
                        self._flush(sock)                     # the SUBSCRIBE
                    elif kind == 9:                           # SUBACK
                        self._on_suback(body)
                    elif kind == 14:                          # DISCONNECT
                        code = body[0] if body else 0
                        return accepted, f"broker sent DISCONNECT: {reason_text(code)}"
                    elif kind != 13:                          # PINGRESP needs nothing
                        raise ProtocolError(f"unexpected packet type {kind} from the broker")
                if publishes:
                    if not accepted:
                        raise ProtocolError("PUBLISH before CONNACK")
                    handler = self._on_batch
                    if handler is None:
                        log.warning("ingest link %s: %d message(s) before any subscribe_batches(), left "
                                    "unacknowledged", self.client_id, len(publishes))
                    else:
                        try:
                            handler(publishes)
                        except Exception:   # unacknowledged: delivered again on a new connection
                            log.exception("ingest link %s: batch handler failed; reconnecting", self.client_id)
                            return accepted, "batch handler failed"
            if not accepted:
                if now - opened > self.connect_timeout_s:
                    return False, f"no CONNACK within {self.connect_timeout_s:g}s"
                continue
            if self.keepalive_s:
                if now - last_received > self.keepalive_s * 1.5:
                    return accepted, f"no packet from the broker for {now - last_received:.0f}s (keepalive)"
                if not pinged and (now - self._last_sent >= self.keepalive_s / 2 or
                                   now - last_received >= self.keepalive_s / 2):
                    sock.sendall(PINGREQ)
                    self._last_sent = now
                    pinged = True

    def _on_connack(self, body: bytes) -> None:
        connack = decode_connack(body)
        if connack.code == 1 and len(body) == 2:  # an MQTT 3.1.1 broker's "unacceptable protocol version"
            raise MqttConnectRefused("broker refused MQTT 5 (it answered as an MQTT 3.1.1 broker): the ingest "
                                     "link needs an MQTT 5 broker such as mosquitto >= 1.6 (or start `litefleet server "
                                     "--ingest-protocol 3.1.1`)")
        if connack.code != 0:
            raise MqttConnectRefused(f"broker refused the connection: {reason_text(connack.code)}")
        with self._lock:
            self.session_present = connack.session_present
            self._connected.set()
            if self._filters:
                self._outbox.append(self._subscribe_packet())
        self.last_error = None
        log.info("ingest link %s connected to %s (session %s)", self.client_id, self.url,
                 "resumed" if self.session_present else "new")

    def _on_suback(self, body: bytes) -> None:
        _, codes = decode_suback(body)
        refused = [(f, c) for f, c in zip(self._filters, codes) if c >= 0x80]
        if refused:
            self.last_error = "broker refused subscription: " + ", ".join(f"{f} {reason_text(c)}" for f, c in refused)
            log.warning("ingest link %s: %s", self.client_id, self.last_error)
            return
        self._subscribed.set()


__all__ = ["IngestLink", "SubscribeToken"]
