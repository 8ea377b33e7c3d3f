"""Encrypted bundles: the model sealed chunk by chunk, its content key wrapped per recipient.

Why this shape (docs/protocol.md, "Encrypted bundles", has the byte layout):

- **Per chunk, at the manifest's chunk size.** Each plaintext chunk of ``chunk_size - 16`` bytes
  becomes one ChaCha20-Poly1305 ciphertext chunk of ``chunk_size`` bytes. The signed manifest's
  ``model`` section describes the *ciphertext* (its size, sha256 and per-chunk sha256), so the
  transfer, the repository and the store handle an encrypted model exactly like a plain one: a
  chunk is checked against its signed hash as it arrives, before anything is decrypted, and a
  download resumes chunk by chunk. ChaCha20-Poly1305 rather than AES-GCM: the Raspberry Pi 4 and
  Zero 2 W have no AES instructions, where ChaCha20 is several times faster than table AES.
- **Nonce and associated data.** Chunk ``i``'s nonce is the random per-encryption
  ``nonce_prefix`` (4 bytes) + ``i`` (8 bytes, big-endian); its associated data binds the
  random ``content_id``, ``i`` and the chunk count, so chunks cannot be reordered, dropped,
  appended or moved between bundles without the AEAD refusing them. The content key is fresh
  per encryption, so nonces never repeat under one key.
- **Key wrap.** For each recipient an ephemeral X25519 key agrees a secret with the recipient's
  public key; HKDF-SHA256 (info: a label, the content id, both public keys) turns it into a
  one-time key that seals the 32-byte content key with ChaCha20-Poly1305 (AD: the content id).
- **Recipients sit in the signed manifest.** A device sees who may open a bundle before it
  fetches a chunk, and nobody can add or swap a recipient without the release key.
  :func:`rewrap` replaces the recipient list (unwrapping with any recipient's private key, the
  publisher's *owner* key by design) and leaves the ciphertext chunks byte-identical; the
  result is signed again with the release key.
- **The plaintext is checked too**: its size and sha256 are in the signed manifest and are
  compared after decryption.

Everything here works on bytes in memory; nothing is written. The agent decrypts at every load
and hands the plaintext to the interpreter; the plaintext never reaches its disk.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import BundleError
from .keys import Recipient, x25519_key_id, x25519_raw
from .manifest import (AEAD_TAG_BYTES, DEFAULT_CHUNK_SIZE, ENCRYPTED_MODEL_FILENAME, ENCRYPTION_AEAD,
                       ENCRYPTION_SCHEME, MODEL_FILENAME, Manifest, chunk_spans, check_model, model_section)

KEY_BYTES = 32
CONTENT_ID_BYTES = 16
NONCE_PREFIX_BYTES = 4
MAX_RECIPIENTS = 10_000          # ~150 bytes each: the manifest stays well under its 4 MiB limit
_CHUNK_AD = b"litefleet.chunk.v1\x00"
_WRAP_INFO = b"litefleet.keywrap.v1\x00"
_WRAP_NONCE = bytes(12)          # the wrap key is used once (fresh ephemeral key per recipient)


class NotRecipientError(BundleError):
    """The bundle's content key is not wrapped for this key: this device or key may not open it."""


class DecryptionError(BundleError):
    """The ciphertext or a wrapped key does not open: altered, or sealed for another key."""


def is_encrypted(manifest: Manifest) -> bool:
    return manifest.encryption is not None


def recipients_of(manifest: Manifest) -> list[dict[str, Any]]:
    """The recipient entries (key id, label) of an encrypted manifest; [] for a plain one."""
    enc = manifest.encryption
    return [{"key_id": r["key_id"], "label": r["label"]} for r in enc["recipients"]] if enc else []


# sealing ----------------------------------------------------------------------------------------

def encrypt(manifest_doc: dict[str, Any], model: bytes, recipients: Sequence[Recipient], *,
            chunk_size: int | None = None) -> tuple[dict[str, Any], bytes]:
    """Seal ``model`` for ``recipients``; return the new manifest document and the ciphertext.

    ``manifest_doc`` describes the plain model (its ``model`` section is replaced). The
    ciphertext chunk size is ``chunk_size`` (default: the manifest's), so chunk boundaries and
    message sizes on the wire stay what they were.
    """
    if manifest_doc.get("encryption"):
        raise BundleError("the bundle is already encrypted; use `litefleet bundle rewrap` to change its recipients")
    plain = Manifest.from_dict(manifest_doc)
    check_model(plain, model)
    size = chunk_size or plain.chunk_size or DEFAULT_CHUNK_SIZE
    if size <= AEAD_TAG_BYTES:
        raise BundleError(f"chunk size {size} is too small: each chunk carries a {AEAD_TAG_BYTES}-byte tag")
    plain_chunk = size - AEAD_TAG_BYTES
    content_key = ChaCha20Poly1305.generate_key()
    content_id = os.urandom(CONTENT_ID_BYTES)
    nonce_prefix = os.urandom(NONCE_PREFIX_BYTES)
    aead = ChaCha20Poly1305(content_key)
    spans = list(chunk_spans(len(model), plain_chunk))
    view = memoryview(model)
    ciphertext = b"".join(aead.encrypt(_nonce(nonce_prefix, i), view[s:e], _chunk_ad(content_id, i, len(spans)))
                          for i, s, e in spans)
    doc = copy.deepcopy(plain.doc)
    doc["model"] = {**model_section(ciphertext, size), "filename": ENCRYPTED_MODEL_FILENAME}
    doc["encryption"] = {
        "scheme": ENCRYPTION_SCHEME, "aead": ENCRYPTION_AEAD,
        "content_id": content_id.hex(), "nonce_prefix": nonce_prefix.hex(),
        "plaintext": {"filename": MODEL_FILENAME, "sha256": plain.sha256, "size": plain.size,
                      "chunk_size": plain_chunk},
        "recipients": _wrap_all(content_key, content_id, recipients),
    }
    Manifest.from_dict(doc)  # the result must be a valid manifest
    return doc, ciphertext


def rewrap(manifest_doc: dict[str, Any], ciphertext: bytes, unwrap_key: X25519PrivateKey,
           recipients: Sequence[Recipient]) -> dict[str, Any]:
    """The manifest with a new recipient list; the ciphertext (and so every chunk hash) is unchanged.

    ``unwrap_key`` must be a recipient's private key (the owner key); it stays a recipient, so a
    bundle never loses the key that can re-wrap it. The content key is checked to open chunk 0
    before anything is wrapped with it.
    """
    manifest = Manifest.from_dict(manifest_doc)
    if not is_encrypted(manifest):
        raise BundleError("the bundle is not encrypted; use `litefleet bundle encrypt` first")
    check_model(manifest, ciphertext)
    content_key = unwrap(manifest, unwrap_key)
    _opener(manifest, ciphertext, content_key)(0)
    owner = Recipient(_owner_label(manifest, unwrap_key), unwrap_key.public_key())
    wanted = list(recipients) + [owner]
    doc = copy.deepcopy(manifest.doc)
    doc["encryption"]["recipients"] = _wrap_all(content_key, bytes.fromhex(doc["encryption"]["content_id"]), wanted)
    Manifest.from_dict(doc)
    return doc


def _owner_label(manifest: Manifest, key: X25519PrivateKey) -> str:
    key_id = x25519_key_id(key.public_key())
    return next((r["label"] for r in manifest.encryption["recipients"] if r["key_id"] == key_id), "owner")


def _wrap_all(content_key: bytes, content_id: bytes, recipients: Sequence[Recipient]) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for recipient in recipients:
        if recipient.key_id not in entries:
            entries[recipient.key_id] = _wrap(content_key, content_id, recipient)
    if not entries:
        raise BundleError("no recipients: name at least one X25519 public key to encrypt for")
    if len(entries) > MAX_RECIPIENTS:
        raise BundleError(f"{len(entries)} recipients is over the limit of {MAX_RECIPIENTS}: encrypt for a fleet "
                          f"key shared by the devices instead of one key per device")
    return list(entries.values())


def _wrap(content_key: bytes, content_id: bytes, recipient: Recipient) -> dict[str, Any]:
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = x25519_raw(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(recipient.key)
    except ValueError:
        raise BundleError(f"recipient {recipient.label!r}: not a usable X25519 public key (low-order point)") from None
    wrap_key = _wrap_key(shared, content_id, ephemeral_raw, x25519_raw(recipient.key))
    sealed = ChaCha20Poly1305(wrap_key).encrypt(_WRAP_NONCE, content_key, content_id)
    return {"key_id": recipient.key_id, "label": recipient.label,
            "ephemeral": base64.b64encode(ephemeral_raw).decode("ascii"),
            "wrapped_key": base64.b64encode(sealed).decode("ascii")}


def _wrap_key(shared: bytes, content_id: bytes, ephemeral_raw: bytes, recipient_raw: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=_WRAP_INFO + content_id + ephemeral_raw + recipient_raw).derive(shared)


# opening ----------------------------------------------------------------------------------------

def unwrap(manifest: Manifest, private_key: X25519PrivateKey) -> bytes:
    """The content key wrapped for ``private_key``; :class:`NotRecipientError` when there is none."""
    enc = manifest.encryption
    if enc is None:
        raise BundleError(f"{manifest.name} v{manifest.version} is not encrypted")
    public_raw = x25519_raw(private_key.public_key())
    key_id = x25519_key_id(private_key.public_key())
    entry = next((r for r in enc["recipients"] if r["key_id"] == key_id), None)
    if entry is None:
        labels = ", ".join(r["label"] or r["key_id"] for r in enc["recipients"][:5])
        more = f" and {len(enc['recipients']) - 5} more" if len(enc["recipients"]) > 5 else ""
        raise NotRecipientError(f"{manifest.name} v{manifest.version} is encrypted for {len(enc['recipients'])} "
                                f"recipient(s) ({labels}{more}); key {key_id} is not one of them")
    content_id = bytes.fromhex(enc["content_id"])
    ephemeral_raw = base64.b64decode(entry["ephemeral"])
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
        wrap_key = _wrap_key(shared, content_id, ephemeral_raw, public_raw)
        return ChaCha20Poly1305(wrap_key).decrypt(_WRAP_NONCE, base64.b64decode(entry["wrapped_key"]), content_id)
    except (InvalidTag, ValueError):
        raise DecryptionError(f"{manifest.name} v{manifest.version}: the content key wrapped for key {key_id} does "
                              f"not open with this private key; the bundle was made wrongly, ask its publisher "
                              f"to re-wrap it") from None


def decrypt(manifest: Manifest, ciphertext: bytes, private_key: X25519PrivateKey) -> bytes:
    """The plain model: ciphertext hashes first (nothing altered is decrypted), then every chunk's
    AEAD, then the plaintext's size and sha256 against the signed manifest."""
    check_model(manifest, ciphertext)
    return decrypt_with(manifest, ciphertext, unwrap(manifest, private_key))


def decrypt_with(manifest: Manifest, ciphertext: bytes, content_key: bytes) -> bytes:
    """Decrypt with an already unwrapped content key (the ciphertext hashes were checked by the caller).

    Each chunk is hashed as soon as it is decrypted, while it is still in the cache, so checking
    the plaintext costs no second walk over the model.
    """
    enc = manifest.encryption
    if enc is None:
        raise BundleError(f"{manifest.name} v{manifest.version} is not encrypted")
    open_chunk = _opener(manifest, ciphertext, content_key)
    digest = hashlib.sha256()
    chunks = []
    for index in range(len(manifest.chunks)):
        chunk = open_chunk(index)
        digest.update(chunk)
        chunks.append(chunk)
    plain = b"".join(chunks)
    expected = enc["plaintext"]
    if len(plain) != expected["size"] or digest.hexdigest() != expected["sha256"]:
        raise DecryptionError(f"{manifest.name} v{manifest.version}: the decrypted model does not match the signed "
                              f"plaintext size and sha256")
    return plain


def _opener(manifest: Manifest, ciphertext: bytes, content_key: bytes) -> Callable[[int], bytes]:
    enc = manifest.encryption
    aead = ChaCha20Poly1305(content_key)
    prefix, content_id = bytes.fromhex(enc["nonce_prefix"]), bytes.fromhex(enc["content_id"])
    count, size = len(manifest.chunks), manifest.chunk_size
    view = memoryview(ciphertext)

    def open_chunk(index: int) -> bytes:
        try:
            return aead.decrypt(_nonce(prefix, index), view[index * size:(index + 1) * size],
                                _chunk_ad(content_id, index, count))
        except InvalidTag:
            raise DecryptionError(f"{manifest.name} v{manifest.version}: encrypted chunk {index} of {count} does "
                                  f"not open (altered, reordered, or sealed under another key)") from None
    return open_chunk


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">Q", index)


def _chunk_ad(content_id: bytes, index: int, count: int) -> bytes:
    return _CHUNK_AD + content_id + struct.pack(">QQ", index, count)


__all__ = ["DecryptionError", "NotRecipientError", "decrypt", "decrypt_with", "encrypt", "is_encrypted",
           "recipients_of", "rewrap", "unwrap"]
