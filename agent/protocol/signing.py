"""Detached Ed25519 signatures over canonical bytes, used for manifests and commands."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import SignatureError
from .keys import PublicKey, key_id

ALGORITHM = "ed25519"
SIGNATURE_VERSION = 1


def canonical_json(doc: Any) -> bytes:
    """The one byte form a document is signed in: sorted keys, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign(data: bytes, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A signature envelope naming the key that made it."""
    return {
        "version": SIGNATURE_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }


def verify(data: bytes, envelope: Any, trusted: Iterable[PublicKey], role: str, what: str) -> PublicKey:
    """Check ``envelope`` over ``data`` against the trusted keys of ``role``; return the signer.

    ``what`` names the signed thing in error messages ("manifest", "command").
    """
    if not isinstance(envelope, dict):
        raise SignatureError(f"{what} signature is not a JSON object")
    if envelope.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{what} signature uses {envelope.get('algorithm')!r}, expected {ALGORITHM!r}")
    signer_id = envelope.get("key_id")
    try:
        raw = base64.b64decode(str(envelope.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} signature is not valid base64") from None
    candidates = [k for k in trusted if k.key_id == signer_id]
    if not candidates:
        raise SignatureError(f"{what} is signed by key {signer_id}, which is not a trusted key")
    for key in candidates:
        if key.role != role:
            article = "an" if role[0] in "aeiou" else "a"
            raise SignatureError(
                f"{what} is signed by key {signer_id}, a {key.role or 'role-less'} key; it needs {article} {role} key")
        try:
            key.key.verify(raw, data)
            return key
        except InvalidSignature:
            pass
    raise SignatureError(f"{what} signature does not match its content (signed by {signer_id}): "
                         f"the {what} was altered after signing")
