"""agent/mqtt_wire.py on hand-made bytes: what differs between MQTT 5 and 3.1.1, and the CONNACK
and SUBACK a client must read (the MQTT 5 PacketReader itself is tested in test_ingest_link.py)."""

from __future__ import annotations

import struct

import pytest

from agent.mqtt import MqttError
from agent.mqtt_wire import (PacketReader, ProtocolError, connect_packet, decode_connack, decode_suback,
                             publish_packet, subscribe_packet, unsubscribe_packet)


def split(packet: bytes, protocol: str = "5") -> tuple[int, bytes]:
    """(first byte, body) of one control packet, through the reader."""
    _, controls = PacketReader(protocol).feed(packet, 1)
    assert len(controls) == 1
    return controls[0]


def test_a_311_connect_has_protocol_level_4_and_no_properties():
    first, body = split(connect_packet("dev1.blob", clean_start=True, keepalive_s=30, protocol="3.1.1"))
    assert first == 0x10
    assert body == b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 30) + b"\x00\x09dev1.blob"


def test_an_mqtt5_connect_has_level_5_and_its_properties():
    _, body = split(connect_packet("c", clean_start=True, keepalive_s=5))
    assert body[6] == 5 and body[7] == 0x02
    assert body[10:19] == b"\x08\x11\x00\x00\x00\x00\x21\xff\xff"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_publish_round_trips_through_the_reader_of_the_same_protocol(protocol):
    packet = publish_packet("lf/v1/f/device/d/chunkreq", b'{"v":1}', qos=1, packet_id=7, protocol=protocol)
    publishes, controls = PacketReader(protocol).feed(packet, 2)
    assert publishes == [("lf/v1/f/device/d/chunkreq", b'{"v":1}', 2 << 16 | 7)] and controls == []
    qos0 = publish_packet("t", b"x", qos=0, protocol=protocol)
    assert PacketReader(protocol).feed(qos0, 1)[0] == [("t", b"x", 0)]


def test_a_311_publish_has_no_properties_byte():
    assert publish_packet("t", b"p", qos=1, packet_id=1, protocol="3.1.1") == b"\x32\x06\x00\x01t\x00\x01p"
    assert publish_packet("t", b"p", qos=1, packet_id=1) == b"\x32\x07\x00\x01t\x00\x01\x00p"


def test_subscribe_and_unsubscribe_differ_only_by_the_properties_byte():
    assert subscribe_packet(3, ["a/b"], 1, "3.1.1") == b"\x82\x08\x00\x03\x00\x03a/b\x01"
    assert subscribe_packet(3, ["a/b"], 1) == b"\x82\x09\x00\x03\x00\x00\x03a/b\x01"
    assert unsubscribe_packet(4, ["a/b"], "3.1.1") == b"\xa2\x07\x00\x04\x00\x03a/b"
    assert unsubscribe_packet(4, ["a/b"]) == b"\xa2\x08\x00\x04\x00\x00\x03a/b"


def test_bad_arguments_are_refused_before_any_byte_is_sent():
    with pytest.raises(MqttError, match="protocol '4'"):
        connect_packet("c", clean_start=True, keepalive_s=1, protocol="4")
    with pytest.raises(MqttError, match="packet id"):
        publish_packet("t", b"", qos=1, packet_id=0)
    with pytest.raises(MqttError, match="qos 2"):
        publish_packet("t", b"", qos=2, packet_id=1)


def test_connack_gives_the_limits_mosquitto_announces_and_steps_over_the_rest():
    # session present; Receive Maximum 100, Maximum Packet Size 327680, Topic Alias Maximum 10,
    # a Reason String and a User Property (string pair), Server Keep Alive 60
    props = (b"\x21\x00\x64" + b"\x27" + struct.pack(">I", 327680) + b"\x22\x00\x0a"
             + b"\x1f\x00\x02ok" + b"\x26\x00\x01k\x00\x01v" + b"\x13\x00\x3c")
    connack = decode_connack(b"\x01\x00" + bytes([len(props)]) + props)
    assert connack.code == 0 and connack.session_present
    assert connack.max_packet_size == 327680 and connack.server_keepalive_s == 60


def test_connack_refusals_are_named_per_protocol():
    assert decode_connack(b"\x00\x87\x00").refusal("5") == "0x87 (not authorized)"
    assert decode_connack(b"\x00\x05", "3.1.1").refusal("3.1.1") == "5 (not authorized)"
    # a 3.1.1 broker answering an MQTT 5 CONNECT: the short form, code 1, no properties to read
    assert decode_connack(b"\x00\x01").code == 1


@pytest.mark.parametrize("body, why", [
    (b"\x00", "1 byte"),
    (b"\x00\x00\x05\x27\x00", "run past the packet"),
    (b"\x00\x00\x02\x7e\x00", "unknown property 0x7E"),
])
def test_malformed_connacks_raise_a_protocol_error_naming_the_fault(body, why):
    with pytest.raises(ProtocolError, match=why):
        decode_connack(body)


def test_suback_codes_per_protocol():
    assert decode_suback(b"\x00\x09\x00\x01") == (9, b"\x01")
    assert decode_suback(b"\x00\x09\x03\x1f\x00\x00\x87") == (9, b"\x87")   # a reason string, then the refusal
    assert decode_suback(b"\x00\x09\x80", "3.1.1") == (9, b"\x80")
    with pytest.raises(ProtocolError, match="SUBACK"):
        decode_suback(b"\x00")
