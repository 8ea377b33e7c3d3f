"""The agent's configuration: ``/etc/litefleet/agent.toml``, validated strictly.

A typo in a key must stop the agent with a message naming the file and the key (and the key
that was probably meant), never run it on a silent default: a device that quietly ignores
``[helth]`` would never roll back a bad model. Errors are :class:`ConfigError`, which makes
``litefleet-agent`` exit with EX_CONFIG (78).

Relative paths in the file are taken relative to the file's own directory.
"""

from __future__ import annotations

import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.protocol import profiles as profiles_mod
from agent.protocol.errors import ProfileError, SchemaError
from agent.protocol.schema import Field, non_negative, positive, validate

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DEFAULT_CONFIG_PATH = Path("/etc/litefleet/agent.toml")
DEFAULT_X25519_KEY = "/etc/litefleet/keys/device.x25519.key"
X25519_CREDENTIAL = "device.x25519.key"   # the name the unit's LoadCredential= gives it
EX_CONFIG = 78
BROKER_SCHEMES = ("mqtt", "mqtts", "ws", "wss")

# Device ids, fleet and group names end up in MQTT topics and file names: no '/', '+', '#', spaces.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_name(value: str) -> str | None:
    if _SAFE_NAME.match(value) and value not in (".", ".."):
        return None
    return (f"{value!r} is not usable in MQTT topics and file names: use 1-128 letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit")


def _safe_names(value: list[str]) -> str | None:
    for item in value:
        problem = _safe_name(item)
        if problem:
            return problem
    return None


def _labels(value: dict[str, Any]) -> str | None:
    for key, item in value.items():
        if _safe_name(str(key)):
            return f"label name {key!r} must be letters, digits, '.', '_' or '-'"
        if not isinstance(item, str):
            return f"label {key!r} must be a string, got {item!r}"
    return None


def _broker_url(value: str) -> str | None:
    if not value:
        return None  # no broker: the device runs standalone (local installs and inference only)
    parts = urlsplit(value)
    if parts.scheme not in BROKER_SCHEMES or not parts.hostname:
        return f"must look like mqtts://broker.example:8883 (schemes: {', '.join(BROKER_SCHEMES)}), got {value!r}"
    try:
        parts.port
    except ValueError:
        return f"has an invalid port: {value!r}"
    return None


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be 0 (TCP listener off) or a port 1-65535, got {value}"


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be a fraction between 0 and 1 (0.05 = 5%), got {value}"


BROKER_SCHEMA = {
    "url": Field(str, required=False, default="", check=_broker_url,
                 doc="empty: no fleet connection"),
    "ca_file": Field(str, required=False, default=""),
    "cert_file": Field(str, required=False, default=""),
    "key_file": Field(str, required=False, default=""),
    "keepalive_s": Field(int, required=False, default=30, check=positive),
}

def _group_name(value: str) -> str | None:
    if not value or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", value):
        return None
    return f"must be a group name (letters, digits, '_', '.', '-'), or empty, got {value!r}"


API_SCHEMA = {
    "unix_socket": Field(str, required=False, default="", doc="empty: <state_dir>/api.sock"),
    "socket_group": Field(str, required=False, default="", check=_group_name,
                          doc="the socket's group: its members may connect; empty: the agent's own group"),
    "tcp_host": Field(str, required=False, default="127.0.0.1"),
    "tcp_port": Field(int, required=False, default=0, check=_port, doc="0: no TCP listener"),
    "tokens_file": Field(str, required=False, default="/etc/litefleet/api-tokens",
                         doc="bearer tokens for the TCP listener: NAME TOKEN [MODELS] per line"),
    "workers": Field(int, required=False, default=2, check=positive),
    "feedback_window": Field(int, required=False, default=10_000, check=positive,
                             doc="predictions remembered for field labels"),
    "drift_window": Field(int, required=False, default=1000, check=positive,
                          doc="inferences in the drift statistics' sliding window"),
}

HEALTH_SCHEMA = {
    "window_s": Field(float, required=False, default=300.0, check=positive),
    "min_requests": Field(int, required=False, default=20, check=positive),
    "max_error_rate": Field(float, required=False, default=0.05, check=_fraction),
    "max_p95_latency_ms": Field(float, required=False, default=0.0, check=non_negative,
                                doc="0: 1.5 x the p95 latency the bundle was validated with"),
}

SCHEMA: dict[str, Field] = {
    "device_id": Field(str, check=_safe_name),
    "fleet": Field(str, required=False, default="default", check=_safe_name),
    "groups": Field(list, required=False, default=[], items=Field(str), check=_safe_names),
    "labels": Field(dict, required=False, default={}, open_table=True, check=_labels),
    "profile": Field(str),
    "profiles_dir": Field(str, required=False, default=""),
    "trusted_keys_dir": Field(str, required=False, default="/etc/litefleet/trusted-keys"),
    "x25519_key_file": Field(str, required=False, default="",
                             doc="the device's X25519 private key for encrypted bundles; empty: none"),
    "state_dir": Field(str, required=False, default="/var/lib/litefleet"),
    "telemetry_interval_s": Field(float, required=False, default=30.0, check=positive),
    "spool_max_rows": Field(int, required=False, default=10_000, check=positive),
    "broker": Field(dict, required=False, default={}, table=BROKER_SCHEMA),
    "api": Field(dict, required=False, default={}, table=API_SCHEMA),
    "health": Field(dict, required=False, default={}, table=HEALTH_SCHEMA),
}


@dataclass(frozen=True)
class BrokerConfig:
    url: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30


@dataclass(frozen=True)
class ApiConfig:
    unix_socket: str = ""       # resolved: never empty after parsing
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 0           # 0: no TCP listener (the default); otherwise bearer tokens are required
    workers: int = 2
    socket_group: str = ""      # "": the socket keeps the agent's group
    tokens_file: str = "/etc/litefleet/api-tokens"
    feedback_window: int = 10_000
    drift_window: int = 1000


@dataclass(frozen=True)
class HealthConfig:
    window_s: float = 300.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_p95_latency_ms: float = 0.0   # 0 = from the manifest's validation latency x 1.5


@dataclass(frozen=True)
class AgentConfig:
    path: str
    device_id: str
    fleet: str
    groups: tuple[str, ...]
    labels: dict[str, str]
    profile: str
    profiles_dir: str          # "" = default lookup
    broker: BrokerConfig
    trusted_keys_dir: Path
    state_dir: Path
    telemetry_interval_s: float
    spool_max_rows: int
    api: ApiConfig
    health: HealthConfig = field(default_factory=HealthConfig)
    x25519_key_file: str = ""  # resolved; systemd's credential device.x25519.key takes precedence

    def load_x25519_key(self) -> "X25519PrivateKey | None":
        """The device's X25519 private key (systemd credential, else ``x25519_key_file``), or None
        when it has none: then it can install only unencrypted bundles."""
        from agent.notify import systemd_credential
        from agent.protocol import keys
        from agent.protocol.errors import KeyFileError
        path = systemd_credential(X25519_CREDENTIAL) or self.x25519_key_file
        if not path:
            return None
        try:
            return keys.load_x25519_private(path)
        except KeyFileError as exc:
            raise ConfigError(f"{self.path}: x25519_key_file: {exc} (`litefleet-agent install` makes the key; "
                              f"an empty x25519_key_file means the device takes only unencrypted bundles)") from None

    def load_profile(self) -> profiles_mod.Profile:
        """The device profile the config names (already checked to load when the config was parsed)."""
        try:
            return profiles_mod.load_profile(self.profile, self.profiles_dir or None)
        except ProfileError as exc:
            raise ConfigError(f"{self.path}: profile: {exc}") from None


def load_config(path: str | Path = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Read and validate the config file; raise :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found: create it or pass --config PATH") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str) -> AgentConfig:
    """Validate config text; ``source`` names it in errors and anchors relative paths."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    for table in ("labels", "broker", "api", "health"):
        raw.setdefault(table, {})  # so the tables' own defaults are filled in
    try:
        doc = validate(raw, SCHEMA, source)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    base = Path(source).parent if source and not source.startswith("<") else Path.cwd()

    def resolve(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    broker = doc["broker"]
    for key in ("ca_file", "cert_file", "key_file"):
        broker[key] = resolve(broker[key])
        if broker[key] and not Path(broker[key]).is_file():
            raise ConfigError(f"{source}: broker.{key}: file {broker[key]} not found")
    if bool(broker["cert_file"]) != bool(broker["key_file"]):
        missing = "key_file" if broker["cert_file"] else "cert_file"
        raise ConfigError(f"{source}: broker.{missing}: a client certificate needs both cert_file and key_file")

    # Read (and so checked) when the agent starts: under systemd the file is root-only and the agent
    # gets a copy as a credential, and `install --root` writes configs naming files of another root.
    x25519_key_file = resolve(doc["x25519_key_file"])

    profiles_dir = resolve(doc["profiles_dir"])
    try:
        profiles_mod.load_profile(doc["profile"], profiles_dir or None)
    except ProfileError as exc:
        raise ConfigError(f"{source}: profile: {exc}") from None

    state_dir = Path(resolve(doc["state_dir"]))
    api = doc["api"]
    unix_socket = resolve(api["unix_socket"]) or str(state_dir / "api.sock")
    return AgentConfig(
        path=source,
        device_id=doc["device_id"],
        fleet=doc["fleet"],
        groups=tuple(doc["groups"]),
        labels={str(k): v for k, v in doc["labels"].items()},
        profile=doc["profile"],
        profiles_dir=profiles_dir,
        broker=BrokerConfig(**broker),
        trusted_keys_dir=Path(resolve(doc["trusted_keys_dir"])),
        state_dir=state_dir,
        telemetry_interval_s=float(doc["telemetry_interval_s"]),
        spool_max_rows=doc["spool_max_rows"],
        api=ApiConfig(unix_socket=unix_socket, tcp_host=api["tcp_host"], tcp_port=api["tcp_port"],
                      workers=api["workers"], socket_group=api["socket_group"],
                      tokens_file=resolve(api["tokens_file"]), feedback_window=api["feedback_window"],
                      drift_window=api["drift_window"]),
        health=HealthConfig(window_s=float(doc["health"]["window_s"]), min_requests=doc["health"]["min_requests"],
                            max_error_rate=float(doc["health"]["max_error_rate"]),
                            max_p95_latency_ms=float(doc["health"]["max_p95_latency_ms"])),
        x25519_key_file=x25519_key_file,
    )


def default_device_id() -> str:
    """The host name, made safe for topics and file names."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_") or "device"
    return name[:128]


def default_config_text(device_id: str | None = None, profile: str = "x86-cpu",
                        x25519_key_file: str = "", unix_socket: str = "", socket_group: str = "") -> str:
    """A commented agent.toml with every key at its default; it parses as it is."""
    return f'''\
# litefleet agent configuration. Unknown keys are errors; relative paths are relative to this file.

# This device's name in the fleet: letters, digits, '.', '_' or '-' (it appears in MQTT topics).
device_id = "{device_id or default_device_id()}"
fleet = "default"
# Rollouts can target groups and labels.
groups = []
# Device profile (firmware_profiles/<name>.toml): runtime, delegates, threads.
profile = "{profile}"
# Where profiles live; empty = $LITEFLEET_PROFILES_DIR or the installed copies.
profiles_dir = ""
# Public keys (release*.pub, operator*.pub, root*.pub) that bundles and commands must be signed by.
trusted_keys_dir = "/etc/litefleet/trusted-keys"
# This device's X25519 private key: opens bundles encrypted for it (its public key goes out in the
# birth message). Empty: only unencrypted bundles. Under systemd the unit hands it over by LoadCredential=.
x25519_key_file = "{x25519_key_file}"
# Installed models, install journal, telemetry spool.
state_dir = "/var/lib/litefleet"
telemetry_interval_s = 30.0
# Telemetry and events kept while the broker is unreachable; the oldest are dropped beyond this.
spool_max_rows = 10000

[labels]
# site = "plant-3"

[broker]
# Empty url: no fleet connection (local installs and inference only). Example: "mqtts://broker:8883".
url = ""
ca_file = ""
cert_file = ""
key_file = ""
keepalive_s = 30

[api]
# Local inference API. Empty unix_socket = <state_dir>/api.sock. The socket is mode 0660: the
# agent's group, or socket_group's members (e.g. "litefleet-api", made by `litefleet-agent
# install`), may connect. An application joins that group: usermod -aG litefleet-api APP_USER.
unix_socket = "{unix_socket}"
socket_group = "{socket_group}"
# TCP listener: 0 = off. When on, every request needs "Authorization: Bearer TOKEN" with a token
# from tokens_file (NAME TOKEN [MODELS] per line, mode 0600).
tcp_host = "127.0.0.1"
tcp_port = 0
tokens_file = "/etc/litefleet/api-tokens"
workers = 2
# Predictions remembered for field labels (POST :feedback); inferences in the drift window.
feedback_window = 10000
drift_window = 1000

[health]
# After a new model is activated, watch it for window_s seconds and roll back on a breach.
window_s = 300.0
min_requests = 20
max_error_rate = 0.05
# 0 = 1.5 x the p95 latency the bundle was validated with (when the manifest records one).
max_p95_latency_ms = 0.0
'''


__all__ = ["DEFAULT_CONFIG_PATH", "EX_CONFIG", "AgentConfig", "ApiConfig", "BrokerConfig", "HealthConfig",
           "load_config", "parse_config", "default_config_text", "default_device_id"]
