"""Ed25519 keys: generation, storage with safe permissions, loading, and key ids.

Three roles: a *release* key signs bundles, an *operator* key signs commands, and a *root*
key signs the list of trusted keys so that the other two can be rotated without reflashing
devices. The role of a key file is its name's prefix (``release.pub``, ``release-2027.pub``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers see old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, with errors that say which file and what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise KeyFileError(f"{path}: key is encrypted; give its passphrase") from None
        raise KeyFileError(f"{path}: key is not encrypted, but a passphrase was given ({exc})") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise KeyFileError(f"{path}: wrong passphrase") from None
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None
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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
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
