"""The bundle manifest: what a model is, what it was validated as, and how to check it.

The manifest is signed; it covers the model through its sha256 and the sha256 of every
fixed-size chunk, so a device can check each chunk as it arrives over MQTT. Its exact JSON
form is documented in docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import datastats
from .errors import BundleError, SchemaError
from .schema import Field, non_empty, non_negative, positive, validate

# A model in memory: bytes, or the read-only map of a download's file (agent/transfer.py).
ModelData = bytes | mmap.mmap

FORMAT = "litefleet.manifest"
FORMAT_VERSION = 1
# 1 MiB: a 15 MB pull from a local mosquitto reached 0.59-0.81x of raw broker throughput in 1 MiB
# chunks (4 in flight) against 0.45-0.56x in 256 KiB chunks (16 in flight), the same 4 MiB
# (docs/benchmarks-mqtt.md). A lost chunk costs 1 MiB again; the broker's packet limit follows.
DEFAULT_CHUNK_SIZE = 1024 * 1024
MODEL_FILENAME = "model.tflite"
ENCRYPTED_MODEL_FILENAME = "model.tflite.enc"   # the bundle member and stored file of an encrypted model
ENCRYPTION_SCHEME = "litefleet.chunked-aead.v1"  # agent/protocol/encryption.py
ENCRYPTION_AEAD = "chacha20-poly1305"
AEAD_TAG_BYTES = 16

QUANT_MODES = ("float32", "float16", "dynamic", "int8", "int16x8")
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NONE = type(None)


def _name(value: str) -> str | None:
    return None if _NAME.match(value) else "must be 1-128 letters, digits, '.', '_' or '-'"


def _sha256(value: str) -> str | None:
    return None if _SHA256.match(value) else "must be 64 lowercase hex digits"


def _hex_bytes(n: int):
    def check(value: str) -> str | None:
        return None if re.fullmatch(f"[0-9a-f]{{{2 * n}}}", value) else f"must be {2 * n} lowercase hex digits"
    return check


def _b64_bytes(n: int):
    def check(value: str) -> str | None:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return "must be base64"
        return None if len(raw) == n else f"must be base64 of {n} bytes, got {len(raw)}"
    return check


def _shape(value: list[Any]) -> str | None:
    if all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value):
        return None
    return f"every dimension must be a fixed positive integer, got {value}"


QUANTIZATION_PARAMS = {
    "scale": Field(list, items=Field(float)),
    "zero_point": Field(list, items=Field(int)),
    "quantized_dimension": Field(int, required=False, default=0),
}

TENSOR_SPEC = {
    "name": Field(str),
    "shape": Field(list, check=_shape),
    "dtype": Field(str, choices=DTYPES),
    "quantization": Field((dict, _NONE), required=False, table=QUANTIZATION_PARAMS),
}

TENSOR_DATA = {
    "dtype": Field(str, choices=DTYPES),
    "shape": Field(list, check=_shape),
    "data": Field(str, doc="base64 of the tensor's bytes, C order, little-endian"),
}

# An encrypted model (agent/protocol/encryption.py); the manifest's ``model`` then describes the
# ciphertext, which is what is sent, stored and hashed chunk by chunk.
ENCRYPTION = {
    "scheme": Field(str, choices=(ENCRYPTION_SCHEME,)),
    "aead": Field(str, choices=(ENCRYPTION_AEAD,)),
    "content_id": Field(str, check=_hex_bytes(16), doc="random per encryption; bound into every chunk and key wrap"),
    "nonce_prefix": Field(str, check=_hex_bytes(4), doc="random per encryption; a chunk's nonce is prefix + index"),
    "plaintext": Field(dict, table={
        "filename": Field(str, choices=(MODEL_FILENAME,)),
        "sha256": Field(str, check=_sha256),
        "size": Field(int, check=positive),
        "chunk_size": Field(int, check=positive),
    }),
    "recipients": Field(list, check=non_empty, items=Field(dict, table={
        "key_id": Field(str, check=_hex_bytes(8), doc="sha256 of the recipient's raw X25519 public key, 16 hex"),
        "label": Field(str, doc="for people: a device id or key file name"),
        "ephemeral": Field(str, check=_b64_bytes(32), doc="the sender's one-time X25519 public key"),
        "wrapped_key": Field(str, check=_b64_bytes(32 + AEAD_TAG_BYTES), doc="the content key, AEAD-wrapped"),
    })),
}

SCHEMA: dict[str, Field] = {
    "format": Field(str, choices=(FORMAT,)),
    "format_version": Field(int, choices=(FORMAT_VERSION,)),
    "name": Field(str, check=_name),
    "version": Field(int, check=positive),
    "profile": Field(str, check=_name),
    "created_at": Field(str),
    "min_agent_version": Field(str),
    "producer": Field(dict, open_table=True),
    "model": Field(dict, table={
        "filename": Field(str, choices=(MODEL_FILENAME, ENCRYPTED_MODEL_FILENAME)),
        "sha256": Field(str, check=_sha256),
        "size": Field(int, check=positive),
        "chunk_size": Field(int, check=positive),
        "chunks": Field(list, items=Field(str, check=_sha256)),
    }),
    "inputs": Field(list, items=Field(dict, table=TENSOR_SPEC)),
    "outputs": Field(list, items=Field(dict, table=TENSOR_SPEC)),
    "quantization": Field(dict, table={
        "mode": Field(str, choices=QUANT_MODES),
        "input_type": Field(str, choices=DTYPES),
        "output_type": Field(str, choices=DTYPES),
        "calibration_samples": Field(int, check=non_negative),
        "settings": Field(dict, required=False, default={}, open_table=True),
    }),
    "accelerator": Field(dict, table={
        "target": Field(str, choices=("cpu", "edgetpu", "gpu")),
        "compiled": Field(bool),
        "ops_mapped": Field((int, _NONE), required=False),
        "ops_total": Field((int, _NONE), required=False),
        "note": Field(str, required=False, default=""),
    }),
    "estimates": Field(dict, table={
        "arena_bytes": Field(int, check=non_negative),
        "peak_memory_bytes": Field(int, check=non_negative),
    }),
    "validation": Field(dict, open_table=True),
    "smoke_test": Field(dict, table={
        "inputs": Field(list, items=Field(dict, table=TENSOR_DATA)),
        "expected_outputs": Field(list, items=Field(dict, table=TENSOR_DATA)),
        "atol": Field(float, check=non_negative,
                      doc="absolute tolerance in the output tensor's own units (quantized steps for integer outputs)"),
    }),
    "forced": Field(list, required=False, default=[], items=Field(str)),
    "encryption": Field((dict, _NONE), required=False, table=ENCRYPTION,
                        doc="absent or null: the model is in the clear"),
    "data_profile": Field((dict, _NONE), required=False, table=datastats.SCHEMA, check=datastats.check,
                          doc="calibration data and output statistics for drift (agent/protocol/datastats.py)"),
}


@dataclass(frozen=True)
class TensorData:
    """A tensor carried in the manifest (the smoke test's sample input and expected output)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "TensorData":
        try:
            raw = base64.b64decode(doc["data"], validate=True)
        except (binascii.Error, ValueError):
            raise BundleError("manifest smoke_test tensor data is not valid base64") from None
        return cls(dtype=doc["dtype"], shape=tuple(doc["shape"]), data=raw)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; ``doc`` is the whole document, the properties its common parts."""

    doc: dict[str, Any]

    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def version(self) -> int:
        return self.doc["version"]

    @property
    def profile(self) -> str:
        return self.doc["profile"]

    @property
    def model(self) -> dict[str, Any]:
        return self.doc["model"]

    @property
    def sha256(self) -> str:
        return self.doc["model"]["sha256"]

    @property
    def size(self) -> int:
        return self.doc["model"]["size"]

    @property
    def chunk_size(self) -> int:
        return self.doc["model"]["chunk_size"]

    @property
    def chunks(self) -> list[str]:
        return self.doc["model"]["chunks"]

    @property
    def min_agent_version(self) -> str:
        return self.doc["min_agent_version"]

    @property
    def encryption(self) -> dict[str, Any] | None:
        """The ``encryption`` section of an encrypted bundle, else None (the model is in the clear)."""
        return self.doc.get("encryption")

    @property
    def data_profile(self) -> "datastats.DataProfile | None":
        """The calibration data's statistics, or None for a bundle made without them."""
        doc = self.doc.get("data_profile")
        return datastats.DataProfile.from_dict(doc, "manifest data_profile") if doc is not None else None

    def canonical_bytes(self) -> bytes:
        from .signing import canonical_json
        return canonical_json(self.doc)

    @classmethod
    def parse(cls, data: bytes, source: str = "manifest.json") -> "Manifest":
        """Parse and validate manifest bytes; raise :class:`BundleError` naming the field."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(doc, source)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "manifest") -> "Manifest":
        try:
            checked = validate(doc, SCHEMA, source)
        except SchemaError as exc:
            raise BundleError(str(exc)) from None
        model = checked["model"]
        expected_chunks = max(1, -(-model["size"] // model["chunk_size"]))
        if len(model["chunks"]) != expected_chunks:
            raise BundleError(f"{source}: model.chunks lists {len(model['chunks'])} hashes, "
                              f"but {model['size']} bytes in {model['chunk_size']}-byte chunks make {expected_chunks}")
        _check_encryption(checked, source)
        return cls(checked)


def _check_encryption(doc: dict[str, Any], source: str) -> None:
    """An encrypted model's sizes must add up: each plaintext chunk gains one AEAD tag."""
    model, enc = doc["model"], doc.get("encryption")
    if (enc is not None) != (model["filename"] == ENCRYPTED_MODEL_FILENAME):
        raise BundleError(f"{source}: model.filename is {model['filename']!r} but the manifest "
                          f"{'has' if enc is not None else 'has no'} encryption section")
    if enc is None:
        return
    plain = enc["plaintext"]
    if model["chunk_size"] != plain["chunk_size"] + AEAD_TAG_BYTES:
        raise BundleError(f"{source}: model.chunk_size {model['chunk_size']} must be encryption.plaintext.chunk_size "
                          f"{plain['chunk_size']} + {AEAD_TAG_BYTES} (one AEAD tag per chunk)")
    count = -(-plain["size"] // plain["chunk_size"])
    if model["size"] != plain["size"] + AEAD_TAG_BYTES * count:
        raise BundleError(f"{source}: model.size {model['size']} must be the plaintext's {plain['size']} bytes "
                          f"plus {AEAD_TAG_BYTES} per chunk ({count} chunks)")


def chunk_spans(size: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, end) of each chunk of a blob."""
    for index, start in enumerate(range(0, max(size, 1), chunk_size)):
        yield index, start, min(start + chunk_size, size)


def chunk_hashes(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[str]:
    """The sha256 of each fixed-size chunk of ``data``, as the manifest lists them."""
    view = memoryview(data)
    return [hashlib.sha256(view[s:e]).hexdigest() for _, s, e in chunk_spans(len(data), chunk_size)]


def model_section(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    """The manifest's ``model`` table for a model file."""
    return {
        "filename": MODEL_FILENAME,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": chunk_hashes(data, chunk_size),
    }


def check_model(manifest: Manifest, data: ModelData) -> None:
    """Raise :class:`~agent.protocol.errors.TamperedError` unless ``data`` is the signed model."""
    from .errors import TamperedError
    if len(data) != manifest.size:
        raise TamperedError(f"model is {len(data)} bytes, the signed manifest says {manifest.size}")
    for (index, start, end), expected in zip(chunk_spans(len(data), manifest.chunk_size), manifest.chunks):
        if hashlib.sha256(memoryview(data)[start:end]).hexdigest() != expected:
            raise TamperedError(f"model chunk {index} (bytes {start}-{end}) does not match its signed sha256")
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise TamperedError("model sha256 does not match the signed manifest")
