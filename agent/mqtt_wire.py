"""MQTT packets as bytes, for the two lean links that bypass paho where its per-message cost is
the limit: telemetry ingest (:mod:`fleet.ingest_link`) and blob chunk streams
(:mod:`agent.blob_link`). Pure: no sockets, so every packet is tested on hand-made bytes.

Both protocol levels the fleet meets: MQTT 5 (``"5"``) and 3.1.1 (``"3.1.1"``, the embedded
demo broker). The differences that matter here are the properties blocks MQTT 5 adds to
CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK and UNSUBSCRIBE; PUBACK (success), PINGREQ and
DISCONNECT (normal) are the same bytes in both.

Only what a client needs is here: encoders for what it sends, a stream splitter for what the
broker sends (:class:`PacketReader`), and decoders for CONNACK and SUBACK.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from agent.mqtt import MqttError

Publish = tuple[str, bytes, int]          # (topic, payload, ack_token)

PROTOCOLS = ("5", "3.1.1")
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"                 # normal disconnection (a persistent session stays)
_REASONS = {0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
            0x83: "implementation specific error", 0x84: "unsupported protocol version",
            0x85: "client identifier not valid", 0x86: "bad user name or password", 0x87: "not authorized",
            0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
            0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
            0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x93: "receive maximum exceeded",
            0x94: "topic alias invalid", 0x95: "packet too large", 0x97: "quota exceeded",
            0x99: "payload format invalid", 0x9A: "retain not supported", 0x9B: "QoS not supported",
            0x9C: "use another server", 0x9D: "server moved", 0x9E: "shared subscriptions not supported",
            0x9F: "connection rate exceeded", 0xA2: "wildcard subscriptions not supported"}
_CONNACK_311 = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                4: "bad user name or password", 5: "not authorized"}
# MQTT 5 property ids -> value layout ("1", "2", "4" byte integers, "v" varint, "s" string,
# "b" binary, "p" string pair): enough to step over any property a broker sends.
_PROPERTY_LAYOUT = {0x01: "1", 0x02: "4", 0x03: "s", 0x08: "s", 0x09: "b", 0x0B: "v", 0x11: "4", 0x12: "s",
                    0x13: "2", 0x15: "s", 0x16: "b", 0x17: "1", 0x18: "4", 0x19: "1", 0x1A: "s", 0x1C: "s",
                    0x1F: "s", 0x21: "2", 0x22: "2", 0x23: "2", 0x24: "1", 0x25: "1", 0x26: "p", 0x27: "4",
                    0x28: "1", 0x29: "1", 0x2A: "1"}
_MAXIMUM_PACKET_SIZE = 0x27
_SERVER_KEEP_ALIVE = 0x13


class ProtocolError(MqttError):
    """The broker sent bytes that are not the MQTT this link expects; the connection is
    dropped and opened again."""


class MqttConnectRefused(ProtocolError):
    """CONNACK with a failure reason code (bad credentials, not authorized, ...)."""


def reason_text(code: int) -> str:
    """``"0x87 (not authorized)"``: an MQTT 5 reason code as a person reads it."""
    return f"0x{code:02X} ({_REASONS.get(code, 'unknown reason')})"


def _check_protocol(protocol: str) -> bool:
    """True for MQTT 5."""
    if protocol not in PROTOCOLS:
        raise MqttError(f"MQTT protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
    return protocol == "5"


# ----------------------------------------------------------------------------- encoding

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise MqttError(f"{text[:40]!r}...: {len(raw)} bytes is over MQTT's 65535-byte string limit")
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, *, clean_start: bool, keepalive_s: int, session_expiry_s: int = 0,
                   receive_maximum: int = 65535, username: str | None = None, password: str | None = None,
                   protocol: str = "5") -> bytes:
    """A CONNECT. MQTT 5 carries Session Expiry Interval and Receive Maximum; 3.1.1 has neither
    (its clean-session flag alone says whether the broker keeps the session)."""
    v5 = _check_protocol(protocol)
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _utf8("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", keepalive_s)
    if v5:
        props = b"\x11" + struct.pack(">I", session_expiry_s) + b"\x21" + struct.pack(">H", receive_maximum)
        body += _varint(len(props)) + props
    body += _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        raw = password.encode()
        body += struct.pack(">H", len(raw)) + raw
    return _packet(0x10, body)


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int, protocol: str = "5") -> bytes:
    """A SUBSCRIBE of ``filters`` at ``qos`` (no properties, default options)."""
    props = b"\x00" if _check_protocol(protocol) else b""
    body = struct.pack(">H", packet_id) + props + b"".join(_utf8(f) + bytes([qos]) for f in filters)
    return _packet(0x82, body)


def unsubscribe_packet(packet_id: int, filters: Sequence[str], protocol: str = "5") -> bytes:
    props = b"\x00" if _check_protocol(protocol) else b""
    return _packet(0xA2, struct.pack(">H", packet_id) + props + b"".join(_utf8(f) for f in filters))


def publish_packet(topic: str, payload: bytes, *, qos: int, packet_id: int = 0, protocol: str = "5") -> bytes:
    """A PUBLISH (QoS 0 or 1, no properties, not retained)."""
    if qos not in (0, 1):
        raise MqttError(f"qos {qos}: only QoS 0 and 1 are sent by this link")
    if qos and not 0 < packet_id <= 0xFFFF:
        raise MqttError(f"a QoS 1 PUBLISH needs a packet id 1..65535, got {packet_id}")
    head = _utf8(topic) + (struct.pack(">H", packet_id) if qos else b"") + (b"\x00" if _check_protocol(protocol) else b"")
    return bytes([0x30 | qos << 1]) + _varint(len(head) + len(payload)) + head + payload


def puback_packets(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs (reason: success, so 4 bytes each, in either protocol) for ``packet_ids``, concatenated."""
    return struct.pack(f">{len(packet_ids)}I", *[0x40020000 | pid for pid in packet_ids])


# ----------------------------------------------------------------------------- decoding

def _read_varint(data: bytes, i: int, n: int, what: str | int) -> tuple[int, int]:
    """(value, next index) of the variable byte integer at ``i``; (-1, i) if ``data`` ends first.

    ``what`` names it in the error: a string, or the packet's first byte for its remaining length
    (so that no text is built per packet)."""
    value = 0
    shift = 0
    while True:
        if i >= n:
            return -1, i
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            name = f"packet (type {what >> 4}) remaining length" if isinstance(what, int) else what
            raise ProtocolError(f"malformed {name}: more than 4 bytes in its variable length")


class PacketReader:
    """Splits a byte stream into MQTT packets; keeps a partial packet for the next read.

    :meth:`feed` returns ``(publishes, controls)``: every complete PUBLISH as ``(topic,
    payload, ack_token)`` and every other packet as ``(first byte, body)``, each list in
    arrival order. ``ack_token`` is ``connection << 16 | packet id`` for QoS 1, 0 for QoS 0.
    """

    def __init__(self, protocol: str = "5") -> None:
        self.v5 = _check_protocol(protocol)
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 1       # bytes needed before parsing can make progress

    @property
    def buffered(self) -> int:
        return self._have

    def feed(self, data: bytes, connection: int) -> tuple[list[Publish], list[tuple[int, bytes]]]:
        self._chunks.append(data)
        self._have += len(data)
        if self._have < self._need:
            return [], []
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        publishes: list[Publish] = []
        controls: list[tuple[int, bytes]] = []
        pos, need = _parse(buf, connection << 16, publishes, controls, self.v5)
        rest = buf[pos:] if pos < len(buf) else b""
        self._chunks = [rest] if rest else []
        self._have = len(rest)
        self._need = need
        return publishes, controls


def _parse(buf: bytes, token_base: int, publishes: list[Publish], controls: list[tuple[int, bytes]],
           v5: bool = True) -> tuple[int, int]:
    """Parse the complete packets of ``buf``; (bytes consumed, bytes needed for the next packet)."""
    n = len(buf)
    pos = 0
    append = publishes.append
    while pos + 2 <= n:
        first = buf[pos]
        length = buf[pos + 1]
        i = pos + 2
        if length & 0x80:
            length, i = _read_varint(buf, pos + 1, n, first)
            if length < 0:
                return pos, n - pos + 1
        end = i + length
        if end > n:
            return pos, end - pos
        if first & 0xF0 == 0x30:
            qos = (first >> 1) & 3
            if i + 2 > end:
                raise ProtocolError(f"malformed PUBLISH: {length}-byte packet has no room for its topic length")
            t_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
            if t_end > end or t_end == i + 2:
                raise ProtocolError(f"malformed PUBLISH: topic length {t_end - i - 2} in a {length}-byte packet")
            try:
                topic = buf[i + 2:t_end].decode()
            except UnicodeDecodeError:
                raise ProtocolError("malformed PUBLISH: topic is not UTF-8") from None
            if qos == 1:
                if t_end + 2 > end:
                    raise ProtocolError(f"malformed PUBLISH on {topic}: no room for the packet id")
                packet_id = (buf[t_end] << 8) | buf[t_end + 1]
                if not packet_id:
                    raise ProtocolError(f"malformed PUBLISH on {topic}: packet id 0")
                token = token_base | packet_id
                j = t_end + 2
            elif qos == 0:
                token = 0
                j = t_end
            else:
                raise ProtocolError(f"PUBLISH at QoS {qos} on {topic}: this link subscribes at QoS 0 or 1 only")
            if v5:
                if j >= end:
                    raise ProtocolError(f"malformed PUBLISH on {topic}: no properties length")
                plen = buf[j]
                j += 1
                if plen & 0x80:
                    plen, j = _read_varint(buf, j - 1, end, "PUBLISH properties length")
                    if plen < 0:
                        raise ProtocolError(f"malformed PUBLISH on {topic}: properties length runs past the packet")
                j += plen
                if j > end:
                    raise ProtocolError(f"malformed PUBLISH on {topic}: {plen}-byte properties in a "
                                        f"{length}-byte packet")
            append((topic, buf[j:end], token))
        else:
            controls.append((first, buf[i:end]))
        pos = end
    return pos, 2


def _properties(body: bytes, i: int, what: str) -> tuple[dict[int, object], int]:
    """The MQTT 5 properties block at ``body[i]``: ({id: value}, index after it). String pairs and
    repeated ids keep the last value; unknown ids are a protocol error (their length is unknown)."""
    n = len(body)
    plen, i = _read_varint(body, i, n, f"{what} properties length")
    if plen < 0 or i + plen > n:
        raise ProtocolError(f"malformed {what}: properties run past the packet")
    end = i + plen
    out: dict[int, object] = {}
    while i < end:
        pid = body[i]
        i += 1
        layout = _PROPERTY_LAYOUT.get(pid)
        if layout is None:
            raise ProtocolError(f"malformed {what}: unknown property 0x{pid:02X}")
        if layout in ("1", "2", "4"):
            size = int(layout)
            value: object = int.from_bytes(body[i:i + size], "big")
            i += size
        elif layout == "v":
            value, i = _read_varint(body, i, end, f"{what} property 0x{pid:02X}")
            if value < 0:
                raise ProtocolError(f"malformed {what}: property 0x{pid:02X} runs past the packet")
        else:
            value = b""
            for _ in range(2 if layout == "p" else 1):
                if i + 2 > end:
                    raise ProtocolError(f"malformed {what}: property 0x{pid:02X} runs past the packet")
                size = (body[i] << 8) | body[i + 1]
                value = body[i + 2:i + 2 + size]
                i += 2 + size
        if i > end:
            raise ProtocolError(f"malformed {what}: property 0x{pid:02X} runs past the packet")
        out[pid] = value
    return out, end


@dataclass(frozen=True)
class Connack:
    """What a client needs from CONNACK: was it accepted (``code`` 0), is a session resumed, and
    the MQTT 5 limits the broker announced (None when absent, or on 3.1.1)."""

    code: int
    session_present: bool
    max_packet_size: int | None = None
    server_keepalive_s: int | None = None

    def refusal(self, protocol: str) -> str:
        if protocol == "5":
            return reason_text(self.code)
        return f"{self.code} ({_CONNACK_311.get(self.code, 'unknown return code')})"


def decode_connack(body: bytes, protocol: str = "5") -> Connack:
    """CONNACK's body. An MQTT 3.1.1 broker answers an MQTT 5 CONNECT with the 2-byte form and
    code 1 (unacceptable protocol version): that comes back as is, for the caller to name."""
    v5 = _check_protocol(protocol)
    if len(body) < 2:
        raise ProtocolError(f"malformed CONNACK: {len(body)} byte(s)")
    code = body[1]
    if not v5 or len(body) == 2 or code:
        return Connack(code, bool(body[0] & 1))
    props, _ = _properties(body, 2, "CONNACK")
    max_packet = props.get(_MAXIMUM_PACKET_SIZE)
    keepalive = props.get(_SERVER_KEEP_ALIVE)
    return Connack(code, bool(body[0] & 1), max_packet if isinstance(max_packet, int) else None,
                   keepalive if isinstance(keepalive, int) else None)


def decode_suback(body: bytes, protocol: str = "5") -> tuple[int, bytes]:
    """(packet id, one reason code per filter: >= 0x80 is a refusal) of a SUBACK's body."""
    v5 = _check_protocol(protocol)
    if len(body) < 3:
        raise ProtocolError(f"malformed SUBACK: {len(body)} byte(s)")
    packet_id = (body[0] << 8) | body[1]
    i = 2
    if v5:
        plen, i = _read_varint(body, 2, len(body), "SUBACK properties length")
        if plen < 0:
            raise ProtocolError("malformed SUBACK: properties length runs past the packet")
        i += plen
    return packet_id, body[i:]


__all__ = ["Connack", "DISCONNECT", "MqttConnectRefused", "PINGREQ", "PROTOCOLS", "PacketReader", "ProtocolError",
           "Publish", "connect_packet", "decode_connack", "decode_suback", "puback_packets", "publish_packet",
           "reason_text", "subscribe_packet", "unsubscribe_packet"]
