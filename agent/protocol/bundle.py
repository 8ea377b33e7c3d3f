"""The bundle file: an uncompressed tar of ``manifest.json``, ``manifest.sig`` and the model.

The model member is ``model.tflite``, or ``model.tflite.enc`` when the model is encrypted
(:mod:`agent.protocol.encryption`); the manifest's ``model.filename`` says which. The manifest
comes first so a reader can check the signature before it reads the model.
Reading and verifying are split: :func:`parse_bundle` and :func:`verify` work on bytes and
hold no I/O, :func:`read_bundle` and :func:`write_bundle` are the file edges.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BundleError, SignatureError, TruncatedBundleError
from .keys import PublicKey, atomic_write
from .manifest import ENCRYPTED_MODEL_FILENAME, MODEL_FILENAME, Manifest, check_model
from .signing import canonical_json, sign
from .signing import verify as verify_signature

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MEMBERS = (MANIFEST_NAME, SIGNATURE_NAME, MODEL_FILENAME)
MODEL_MEMBERS = (MODEL_FILENAME, ENCRYPTED_MODEL_FILENAME)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
BUNDLE_SUFFIX = ".lfb"


@dataclass(frozen=True)
class Bundle:
    """A bundle's three parts, as read; nothing in it is trusted until :func:`verify`."""

    manifest_bytes: bytes
    signature_bytes: bytes
    model: bytes
    model_name: str | None = None   # the tar member the model came from; None when not read from a file


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and model hashes checked out."""

    manifest: Manifest
    signer: PublicKey
    model: bytes


def blob_id(manifest_bytes: bytes) -> str:
    """The id under which a repository stores and serves a bundle: sha256 hex of its signed
    ``manifest.json`` bytes.

    One blob per signed manifest; the manifest names the model by its own sha256. Keying by the
    model's hash instead would merge bundles that share model bytes but differ in manifest (the
    same int8 model for two profiles), and a device could be served the other profile's head.
    """
    return hashlib.sha256(manifest_bytes).hexdigest()


def build(manifest_doc: dict[str, Any], model: bytes, release_key: Ed25519PrivateKey) -> bytes:
    """Sign a manifest and pack it with its model; the manifest must already describe the model."""
    manifest = Manifest.from_dict(manifest_doc)
    check_model(manifest, model)
    manifest_bytes = canonical_json(manifest.doc)
    signature = json.dumps(sign(manifest_bytes, release_key), sort_keys=True).encode()
    out = io.BytesIO()
    names = (MANIFEST_NAME, SIGNATURE_NAME, manifest.model["filename"])
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in zip(names, (manifest_bytes, signature, model)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_bundle(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a bundle atomically: the output folder never holds a partial bundle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o644)
    return path


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle file; raise :class:`BundleError` naming the file when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: bundle file not found") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read bundle: {exc.strerror}") from None
    try:
        return parse_bundle(data)
    except BundleError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def parse_bundle(data: bytes) -> Bundle:
    """Split bundle bytes into their parts, checking the layout but trusting nothing."""
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in MEMBERS and member.name not in MODEL_MEMBERS:
                    raise BundleError(f"unexpected file {member.name!r} in bundle (expected {', '.join(MEMBERS)}, "
                                      f"or {ENCRYPTED_MODEL_FILENAME} for an encrypted model)")
                if member.name in parts or (member.name in MODEL_MEMBERS and any(m in parts for m in MODEL_MEMBERS)):
                    raise BundleError(f"bundle holds {member.name!r} twice" if member.name in parts
                                      else "bundle holds two models")
                if not member.isfile():
                    raise BundleError(f"bundle member {member.name!r} is not a regular file")
                if member.name not in MODEL_MEMBERS and member.size > MAX_MANIFEST_BYTES:
                    raise BundleError(f"bundle member {member.name!r} is {member.size} bytes, over the "
                                      f"{MAX_MANIFEST_BYTES}-byte limit")
                handle = tar.extractfile(member)
                content = handle.read() if handle else b""
                if len(content) != member.size:
                    raise TruncatedBundleError(f"bundle is truncated: {member.name} has {len(content)} of "
                                               f"{member.size} bytes")
                parts[member.name] = content
    except tarfile.ReadError as exc:
        if not data:
            raise TruncatedBundleError("bundle is empty") from None
        raise TruncatedBundleError(f"not a bundle or truncated ({exc})") from None
    except (tarfile.TarError, EOFError) as exc:
        raise TruncatedBundleError(f"bundle is truncated ({exc})") from None
    model_name = next((m for m in MODEL_MEMBERS if m in parts), MODEL_FILENAME)
    missing = [m for m in (MANIFEST_NAME, SIGNATURE_NAME, model_name) if m not in parts]
    if missing:
        raise TruncatedBundleError(f"bundle is missing {', '.join(missing)} (truncated or not a litefleet bundle)")
    return Bundle(parts[MANIFEST_NAME], parts[SIGNATURE_NAME], parts[model_name], model_name)


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes, trusted: Iterable[PublicKey]) -> tuple[Manifest, PublicKey]:
    """Check the manifest's signature against trusted release keys, then its schema."""
    try:
        envelope = json.loads(signature_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SignatureError("manifest.sig is not a signature envelope (not JSON)") from None
    signer = verify_signature(manifest_bytes, envelope, trusted, role="release", what="manifest")
    return Manifest.parse(manifest_bytes), signer


def verify(bundle: Bundle, trusted: Iterable[PublicKey]) -> VerifiedBundle:
    """Signature first, then the model against the signed hashes."""
    manifest, signer = verify_manifest(bundle.manifest_bytes, bundle.signature_bytes, list(trusted))
    if bundle.model_name is not None and bundle.model_name != manifest.model["filename"]:
        raise BundleError(f"the model member is {bundle.model_name!r}, the signed manifest names "
                          f"{manifest.model['filename']!r}")
    check_model(manifest, bundle.model)
    return VerifiedBundle(manifest=manifest, signer=signer, model=bundle.model)


def inspect(bundle: Bundle) -> dict[str, Any]:
    """The manifest and signature of an unverified bundle, for a person to read."""
    try:
        manifest = json.loads(bundle.manifest_bytes)
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest.json is not valid JSON ({exc})") from None
    try:
        signature = json.loads(bundle.signature_bytes)
    except json.JSONDecodeError:
        signature = None
    return {"manifest": manifest, "signature": signature, "model_bytes": len(bundle.model)}
