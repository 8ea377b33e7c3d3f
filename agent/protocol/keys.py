"""Keys: generation, storage with safe permissions, loading, and key ids.

Ed25519 keys sign, in three roles: a *release* key signs bundles, an *operator* key signs
commands, and a *root* key signs the list of trusted keys so that the other two can be rotated
without reflashing devices. The role of a key file is its name's prefix (``release.pub``,
``release-2027.pub``). X25519 keys (at the end of this module) receive encrypted bundles.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .errors import KeyFileError

ROLES = ("release", "operator", "root")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key with the role it may sign for."""

    role: str
    key: Ed25519PublicKey
    path: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def generate(role: str, out_dir: str | os.PathLike[str], passphrase: bytes | None = None,
             name: str | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as ``{name}.key`` (mode 0600) and ``{name}.pub``; return both paths.

    Existing key files are never replaced unless ``overwrite``: losing a release key means
    reflashing a fleet.
    """
    if role not in ROLES:
        raise KeyFileError(f"unknown key role {role!r}: choose one of {', '.join(ROLES)}")
    stem = name or role
    if not stem.startswith(role):
        raise KeyFileError(f"key name {stem!r} must start with its role {role!r} so devices can tell its role")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{stem}.key", out / f"{stem}.pub"
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key (move it away first)")
    private_key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_private(private_path, private_pem)
    atomic_write(public_path, public_pem, mode=0o644)
    return private_path, public_path


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes so that no other user can ever read them, not even briefly."""
    atomic_write(path, data, mode=0o600)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers see old or new.
    ``durable``: fsync the file and its directory, so that the new content survives a power cut
    (not needed for what is checked on every read and fetched again when it fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_pem_private(path: Path, passphrase: bytes | None, what: str = "key") -> Any:
    """The private key in a PEM file, whatever its type; errors name the file and what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise KeyFileError(f"{path}: key is encrypted; give its passphrase") from None
        raise KeyFileError(f"{path}: key is not encrypted, but a passphrase was given ({exc})") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise KeyFileError(f"{path}: wrong passphrase") from None
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None


def _read_pem_public(path: Path) -> Any:
    """The public key in a PEM file, whatever its type; errors name the file and what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror}") from None
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None


def load_private(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, with errors that say which file and what is wrong."""
    path = Path(path)
    key = _read_pem_private(path, passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def role_of(path: Path) -> str:
    """The role named by a public key file's name, or '' when the name names none."""
    stem = path.name.split(".")[0]
    for role in ROLES:
        if stem == role or stem.startswith(role + "-") or stem.startswith(role + "_"):
            return role
    return ""


def load_public(path: str | os.PathLike[str], role: str | None = None) -> PublicKey:
    """Load an Ed25519 public key; its role comes from ``role`` or the file name."""
    path = Path(path)
    key = _read_pem_public(path)
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return PublicKey(role=role or role_of(path), key=key, path=str(path))


def load_trusted_dir(directory: str | os.PathLike[str]) -> list[PublicKey]:
    """Every ``*.pub`` in a trusted-keys directory whose name tells its role."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: trusted key directory not found")
    keys = []
    for path in sorted(directory.glob("*.pub")):
        key = load_public(path)
        if not key.role:
            raise KeyFileError(f"{path}: name must start with one of {', '.join(ROLES)} to say the key's role")
        keys.append(key)
    return keys


def load_trust_paths(paths: Iterable[str | os.PathLike[str]]) -> list[PublicKey]:
    """Public keys named on a command line: key files, or trusted-key directories.

    A key file whose name names no role is taken as a release key (``--trust mykey.pub``).
    """
    trusted: list[PublicKey] = []
    for path in map(Path, paths):
        if path.is_dir():
            trusted.extend(load_trusted_dir(path))
        else:
            key = load_public(path)
            trusted.append(key if key.role else PublicKey("release", key.key, key.path))
    return trusted


# X25519 keys: who may decrypt an encrypted bundle ------------------------------------------
#
# Not a signing role: an X25519 key pair receives the content key of encrypted bundles. A
# device makes its own at install (its public half goes out in the birth message); a publisher
# keeps an *owner* key that is a recipient of every bundle it encrypts, so it can re-wrap them.
# Files: ``NAME.x25519.key`` (PKCS#8 PEM, mode 0600) and ``NAME.x25519.pub`` (SubjectPublicKeyInfo PEM).

X25519 = "x25519"
X25519_PUBLIC_SUFFIX = ".x25519.pub"
X25519_PRIVATE_SUFFIX = ".x25519.key"


def x25519_raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_key_id(public_key: X25519PublicKey) -> str:
    """The recipient id an encrypted manifest names: the first 16 hex digits of the raw key's sha256."""
    return hashlib.sha256(x25519_raw(public_key)).hexdigest()[:16]


def x25519_b64(public_key: X25519PublicKey) -> str:
    """The public key as the birth message and ``litefleet fleet keys`` carry it: base64 of 32 raw bytes."""
    return base64.b64encode(x25519_raw(public_key)).decode("ascii")


def x25519_from_b64(text: Any, source: str) -> X25519PublicKey:
    """Parse a base64 raw X25519 public key; ``source`` names where it came from in the error."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source}: X25519 public key is not valid base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{source}: X25519 public key must be 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class Recipient:
    """A public key an encrypted bundle's content key is wrapped for; ``label`` is for people
    (a device id, a key file's name) and is recorded in the signed manifest."""

    label: str
    key: X25519PublicKey

    @property
    def key_id(self) -> str:
        return x25519_key_id(self.key)


def x25519_private_pem(private_key: X25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def x25519_public_pem(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_x25519(out_dir: str | os.PathLike[str], name: str = "owner", passphrase: bytes | None = None,
                    overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``{name}.x25519.key`` (mode 0600) and ``{name}.x25519.pub``; never replace existing keys
    unless ``overwrite``: bundles encrypted for a lost key cannot be opened again."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name or ""):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '_' or '-' (the files are "
                           f"NAME{X25519_PRIVATE_SUFFIX} and NAME{X25519_PUBLIC_SUFFIX})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}{X25519_PRIVATE_SUFFIX}", out / f"{name}{X25519_PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key (move it away first)")
    private_key = X25519PrivateKey.generate()
    write_private(private_path, x25519_private_pem(private_key, passphrase))
    atomic_write(public_path, x25519_public_pem(private_key.public_key()), mode=0o644)
    return private_path, public_path


def load_x25519_private(path: str | os.PathLike[str], passphrase: bytes | None = None) -> X25519PrivateKey:
    """Load an X25519 private key (PEM), with errors that say which file and what is wrong."""
    path = Path(path)
    key = _read_pem_private(path, passphrase, "X25519 key")
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path}: not an X25519 key ({type(key).__name__}); make one with "
                           f"`litefleet keys generate --role x25519`")
    return key


def load_x25519_public(path: str | os.PathLike[str]) -> X25519PublicKey:
    path = Path(path)
    key = _read_pem_public(path)
    if not isinstance(key, X25519PublicKey):
        raise KeyFileError(f"{path}: not an X25519 public key ({type(key).__name__}): encrypt for "
                           f"*{X25519_PUBLIC_SUFFIX} files or `litefleet fleet keys --json` output")
    return key


def _label(path: Path) -> str:
    name = path.name
    for suffix in (X25519_PUBLIC_SUFFIX, ".pub"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def load_recipients(paths: Iterable[str | os.PathLike[str]]) -> list[Recipient]:
    """The recipients named on a command line (``--encrypt-for``), duplicates removed, in order.

    Each path is an X25519 public key file (PEM), a directory (every ``*.x25519.pub`` in it), or
    the JSON that ``litefleet fleet keys --json`` prints (every device listed with a key).
    """
    found: list[Recipient] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.glob(f"*{X25519_PUBLIC_SUFFIX}"))
            if not files:
                raise KeyFileError(f"{path}: no *{X25519_PUBLIC_SUFFIX} files in this directory")
            found.extend(Recipient(_label(f), load_x25519_public(f)) for f in files)
        elif path.suffix == ".json":
            found.extend(_recipients_from_json(path))
        else:
            found.append(Recipient(_label(path), load_x25519_public(path)))
    unique: dict[str, Recipient] = {}
    for recipient in found:
        unique.setdefault(recipient.key_id, recipient)
    return list(unique.values())


def _recipients_from_json(path: Path) -> list[Recipient]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"{path}: not readable JSON ({exc})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f"{path}: expected the output of `litefleet fleet keys --json` (an object with a "
                           f"'keys' list)")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("device_id"), str) or not entry.get("x25519"):
            raise KeyFileError(f"{path}: keys[{i}] needs a 'device_id' and an 'x25519' key")
        out.append(Recipient(entry["device_id"], x25519_from_b64(entry["x25519"], f"{path}: keys[{i}]")))
    if not out:
        raise KeyFileError(f"{path}: lists no device keys; devices report their key in their birth message "
                           f"once their agent has an x25519_key_file")
    return out
