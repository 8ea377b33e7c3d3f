"""Schemas and codecs of every message on the broker. docs/protocol.md documents each.

JSON messages carry ``"v": 1``; a receiver drops (with a log line) anything that does not
parse, is over its size limit, or does not match its schema, and keeps serving. Chunks are
binary with a fixed header (see :func:`encode_chunk`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from .errors import SchemaError
from .schema import Field, non_negative, validate
from .signing import canonical_json

MESSAGE_VERSION = 1
MAX_JSON_BYTES = 1 * 1024 * 1024   # a larger JSON message is dropped unread
_NONE = type(None)


class MessageError(SchemaError):
    """A message that does not parse or match its schema; ``source`` names the topic."""


def _version() -> Field:
    return Field(int, choices=(MESSAGE_VERSION,))


MODEL_REF = {
    "name": Field(str), "version": Field(int), "sha256": Field(str),
}

STATUS = {
    "v": _version(),
    "state": Field(str, choices=("online", "offline")),
    "device_id": Field(str),
    "ts": Field(float),
    "reason": Field(str, required=False, default=""),
    "fleet": Field(str, required=False, default=""),
    "groups": Field(list, required=False, default=[], items=Field(str)),
    "labels": Field(dict, required=False, default={}, open_table=True),
    "profile": Field(str, required=False, default=""),
    "agent_version": Field(str, required=False, default=""),
    "runtime": Field(dict, required=False, default={}, open_table=True),
    "delegates_available": Field(list, required=False, default=[], items=Field(str)),
    "engine": Field(dict, required=False, default={}, open_table=True),
    "active_model": Field((dict, _NONE), required=False, table=MODEL_REF),
    "hardware": Field(dict, required=False, default={}, open_table=True),
    "public_keys": Field(dict, required=False, default={}, open_table=True),
}

TELEMETRY = {
    "v": _version(),
    "device_id": Field(str),
    "seq": Field(int, check=non_negative),
    "ts": Field(float),
    "data": Field(dict, open_table=True),
}

EVENT = {
    "v": _version(),
    "device_id": Field(str),
    "seq": Field(int, check=non_negative),
    "ts": Field(float),
    "kind": Field(str),
    "reason": Field(str),
    "command_id": Field(str, required=False, default=""),
    "details": Field(dict, required=False, default={}, open_table=True),
}

CHUNK_REQUEST = {
    "v": _version(),
    "device_id": Field(str),
    "blob": Field(str),
    "head": Field(bool, required=False, default=False, doc="also send the manifest and its signature"),
    "chunks": Field(list, items=Field(int, check=non_negative)),
}

COMMAND_BODY = {
    "v": _version(),
    "id": Field(str, doc="unique per command (a nonce): a device never executes one id twice"),
    "seq": Field(int, check=non_negative, doc="per operator key, increasing"),
    "fleet": Field(str),
    "issued_at": Field(float),
    "expires_at": Field(float),
    "target": Field(dict, table={
        "scope": Field(str, choices=("device", "group", "profile", "all")),
        "name": Field(str, required=False, default=""),
    }),
    "action": Field(str, choices=("deploy", "rollback", "config")),
    "args": Field(dict, open_table=True),
}

COMMAND = {
    "v": _version(),
    "body": Field(dict, open_table=True),
    "signature": Field(dict, open_table=True),
}

SCHEMAS: dict[str, dict[str, Field]] = {
    "status": STATUS, "telemetry": TELEMETRY, "events": EVENT, "chunkreq": CHUNK_REQUEST, "cmd": COMMAND,
}


def encode(doc: dict[str, Any]) -> bytes:
    """Compact JSON as sent on the wire."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode(payload: bytes, kind: str, source: str) -> dict[str, Any]:
    """Parse and validate a JSON message of ``kind``; raise :class:`MessageError` saying why."""
    if len(payload) > MAX_JSON_BYTES:
        raise MessageError(source, "", f"{len(payload)} bytes is over the {MAX_JSON_BYTES}-byte message limit")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MessageError(source, "", f"not valid JSON ({str(exc)[:80]})") from None
    try:
        return validate(doc, SCHEMAS[kind], source)
    except SchemaError as exc:
        raise MessageError(exc.source, exc.field, exc.problem) from None


def command_signed_bytes(body: dict[str, Any]) -> bytes:
    """The bytes an operator signs for a command: the canonical JSON of its body."""
    return canonical_json(body)


# Binary chunk messages --------------------------------------------------------------------
#
#   offset size  field
#   0      4     magic b"LFC1"
#   4      1     kind: 0 = model chunk, 1 = head (manifest + signature)
#   5      4     index (big-endian u32); for a head: 0
#   9      4     count of chunks in the blob (u32)
#   13     ...   payload: the chunk's bytes; for a head: u32 manifest length, manifest, signature

CHUNK_MAGIC = b"LFC1"
KIND_CHUNK = 0
KIND_HEAD = 1
_HEADER = struct.Struct(">4sBII")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class ChunkMessage:
    kind: int
    index: int
    count: int
    payload: bytes


def encode_chunk(index: int, count: int, payload: bytes) -> bytes:
    return _HEADER.pack(CHUNK_MAGIC, KIND_CHUNK, index, count) + payload


def chunk_header(index: int, count: int) -> bytes:
    """The header :func:`encode_chunk` puts before a chunk's bytes (for a sender that reads the
    chunk straight into the message after it)."""
    return _HEADER.pack(CHUNK_MAGIC, KIND_CHUNK, index, count)


def encode_head(count: int, manifest: bytes, signature: bytes) -> bytes:
    return _HEADER.pack(CHUNK_MAGIC, KIND_HEAD, 0, count) + struct.pack(">I", len(manifest)) + manifest + signature


def decode_chunk(payload: bytes, source: str) -> ChunkMessage:
    if len(payload) < HEADER_SIZE:
        raise MessageError(source, "", f"chunk message of {len(payload)} bytes is shorter than its header")
    magic, kind, index, count = _HEADER.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise MessageError(source, "", "not a litefleet chunk (bad magic)")
    if kind not in (KIND_CHUNK, KIND_HEAD):
        raise MessageError(source, "", f"unknown chunk kind {kind}")
    if kind == KIND_CHUNK and index >= count:
        raise MessageError(source, "", f"chunk index {index} is out of range for {count} chunks")
    return ChunkMessage(kind, index, count, payload[HEADER_SIZE:])


def split_head(message: ChunkMessage, source: str) -> tuple[bytes, bytes]:
    """(manifest bytes, signature bytes) of a head message."""
    body = message.payload
    if len(body) < 4:
        raise MessageError(source, "", "head message is truncated")
    (length,) = struct.unpack_from(">I", body)
    if length > len(body) - 4:
        raise MessageError(source, "", "head message's manifest length exceeds the message")
    return body[4:4 + length], body[4 + length:]
