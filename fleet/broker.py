"""``litefleet broker config``: a mosquitto configuration with TLS, a private CA and an ACL.

The identity of every client comes from its certificate's CN (``use_identity_as_username``),
never from the MQTT client id, and the ACL is written on that identity: a device may publish
only its own status, telemetry, events and chunk requests and read only its own, its
groups', its profile's and fleet-wide commands and the blob chunk streams. The operator
identity may publish commands; the server (repository) identity reads every device's
reports and publishes chunks and commands.

Rendering is pure (``render_*`` return text); :func:`generate` is the only function that
touches the disk. Re-running on an existing directory reuses its CA and issues only the
certificates that are missing, which is how devices are added.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol.errors import LitefleetError, SchemaError
from agent.protocol.keys import atomic_write, write_private
from agent.protocol.schema import Field, one_of_each, validate
from agent.protocol.topics import Topic, Topics, check_id
from fleet import pki

DEFAULT_PORT = 8883
DEFAULT_CHUNK_SIZE = 1024 * 1024      # agent/protocol/manifest.py: bundles are cut in these by default
HEADROOM = 64 * 1024                  # chunk header, topic, MQTT 5 properties, the head message's manifest
DEFAULT_MAX_QUEUED_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 100
DEFAULT_OPERATOR = "operator"
DEFAULT_SERVER = "litefleet-server"
LOCAL_HOSTS = ("localhost", "127.0.0.1")


class BrokerConfigError(LitefleetError):
    """The broker configuration cannot be generated as asked (bad spec, existing files)."""


# Inputs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSpec:
    """One device: its id (the CN of its certificate), its groups and its profile."""

    id: str
    groups: tuple[str, ...] = ()
    profile: str = ""

    def __post_init__(self) -> None:
        check_id("device id", self.id)
        for group in self.groups:
            check_id(f"group of device {self.id}", group)
        if self.profile:
            check_id(f"profile of device {self.id}", self.profile)


def parse_device_spec(text: str) -> DeviceSpec:
    """``ID[:GROUP,GROUP...][@PROFILE]`` -> :class:`DeviceSpec`; ValueError says what is wrong."""
    rest, _, profile = text.partition("@")
    device_id, _, groups = rest.partition(":")
    group_list = tuple(g.strip() for g in groups.split(",") if g.strip()) if groups else ()
    try:
        return DeviceSpec(device_id.strip(), group_list, profile.strip())
    except ValueError as exc:
        raise ValueError(f"device spec {text!r}: {exc} (format: ID[:GROUP,GROUP...][@PROFILE])") from None


def _safe_id(kind: str):
    def check(value: str) -> str | None:
        try:
            check_id(kind, value)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def _safe_ids(kind: str):
    one = _safe_id(kind)

    def check(values: list[str]) -> str | None:
        for value in values:
            problem = one(value)
            if problem:
                return problem
        return one_of_each(values)
    return check


DEVICE_SCHEMA = {
    "id": Field(str, check=_safe_id("device id")),
    "groups": Field(list, required=False, default=[], items=Field(str), check=_safe_ids("group")),
    "profile": Field(str, required=False, default="", doc="empty: no profile commands for this device"),
}
DEVICES_FILE_SCHEMA = {
    "device": Field(list, required=False, default=[], items=Field(dict, table=DEVICE_SCHEMA)),
}


def parse_devices_toml(text: str, source: str) -> list[DeviceSpec]:
    """The ``[[device]]`` tables of a devices file; errors name ``source`` and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(source, "", f"not valid TOML: {exc}") from None
    checked = validate(doc, DEVICES_FILE_SCHEMA, source)
    return [DeviceSpec(d["id"], tuple(d["groups"]), d["profile"]) for d in checked["device"]]


def load_devices_file(path: Path) -> list[DeviceSpec]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BrokerConfigError(f"{path}: cannot read devices file: {exc.strerror}") from None
    return parse_devices_toml(text, str(path))


def render_devices_toml(devices: Sequence[DeviceSpec]) -> str:
    """The devices file format, used to record which devices a config directory covers."""
    out = ["# Devices covered by this broker configuration (read back by `litefleet broker config`).", ""]
    for d in sorted(devices, key=lambda d: d.id):
        groups = ", ".join(f'"{g}"' for g in d.groups)  # ids cannot contain quotes or backslashes
        out += ["[[device]]", f'id = "{d.id}"', f"groups = [{groups}]"]
        if d.profile:
            out.append(f'profile = "{d.profile}"')
        out.append("")
    return "\n".join(out)


def with_recorded(recorded: Sequence[DeviceSpec], given: Sequence[DeviceSpec]) -> list[DeviceSpec]:
    """Devices recorded by an earlier run plus the ones given now; a given spec replaces a recorded one."""
    by_id = {d.id: d for d in recorded}
    by_id.update({d.id: d for d in given})
    return sorted(by_id.values(), key=lambda d: d.id)


def merge_devices(specs: Iterable[DeviceSpec]) -> list[DeviceSpec]:
    """One spec per device id; the same id given twice with different groups/profile is an error."""
    seen: dict[str, DeviceSpec] = {}
    for spec in specs:
        if spec.id in seen and seen[spec.id] != spec:
            raise BrokerConfigError(f"device {spec.id!r} is given twice with different groups or profile: "
                                    f"{seen[spec.id]} and {spec}")
        seen[spec.id] = spec
    return list(seen.values())


@dataclass(frozen=True)
class BrokerSettings:
    """Everything the rendered configuration depends on, besides the device list."""

    fleet: str
    port: int = DEFAULT_PORT
    bind_address: str = ""                 # empty: every interface
    hosts: tuple[str, ...] = ()            # server certificate names besides localhost/127.0.0.1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    operator: str = DEFAULT_OPERATOR
    server: str = DEFAULT_SERVER
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    run_as: str = ""                       # mosquitto's ``user``; empty: its default (``mosquitto``)
    tls_version: str = "tlsv1.2"           # the minimum accepted

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        check_id("operator name", self.operator)
        check_id("server name", self.server)
        if self.operator == self.server:
            raise ValueError(f"operator and server identities must differ (both {self.operator!r})")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 1024 <= self.chunk_size <= 64 * 1024 * 1024:
            raise ValueError(f"chunk size must be 1 KiB to 64 MiB, got {self.chunk_size}")
        if self.max_inflight_messages < 1:
            raise ValueError("max_inflight_messages must be at least 1 (0 would be unlimited)")
        if self.max_queued_bytes < 0:
            raise ValueError("max_queued_bytes must be 0 (unlimited) or more")
        if self.tls_version not in ("tlsv1.2", "tlsv1.3"):
            raise ValueError(f"tls_version must be tlsv1.2 or tlsv1.3, got {self.tls_version!r}")

    @property
    def max_packet_size(self) -> int:
        """The largest MQTT packet the broker takes: one chunk plus headroom for headers."""
        return self.chunk_size + HEADROOM

    @property
    def server_hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.hosts, *LOCAL_HOSTS)))


@dataclass(frozen=True)
class Layout:
    """Where every generated file lives inside the output directory (absolute paths)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    ca_cert = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_cert = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    clients = property(lambda self: self.root / "clients")
    conf = property(lambda self: self.root / "mosquitto.conf")
    acl = property(lambda self: self.root / "acl")
    data = property(lambda self: self.root / "data")
    log = property(lambda self: self.root / "mosquitto.log")
    devices = property(lambda self: self.root / "devices.toml")

    def client_cert(self, name: str) -> Path:
        return self.clients / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.clients / f"{name}.key"


# Rendering (pure) ---------------------------------------------------------------------------

def _filter(fleet: str, scope: str, name: str, channel: str) -> str:
    """A topic filter in the layout of :mod:`agent.protocol.topics`, with ``name`` a wildcard
    (``+``) or an ACL substitution (``%u``) that Topics' id check would (rightly) refuse."""
    return str(Topic(fleet, scope, name, channel))


def device_rights(fleet: str) -> tuple[list[str], list[str]]:
    """(write, read) ACL patterns every certificate gets on its own identity ``%u``."""
    write = [_filter(fleet, "device", "%u", ch) for ch in ("status", "telemetry", "events", "chunkreq")]
    read = [_filter(fleet, "device", "%u", "cmd")]
    return write, read


def device_reads(fleet: str, device: DeviceSpec) -> list[str]:
    """Topics one device reads besides its own commands: fleet, group and profile commands, chunks."""
    topics = Topics(fleet)
    read = [str(topics.commands("all"))]
    read += [str(topics.commands("group", g)) for g in device.groups]
    if device.profile:
        read.append(str(topics.commands("profile", device.profile)))
    read.append(topics.all_blobs())
    return read


def command_filters(fleet: str) -> list[str]:
    """Every command topic of the fleet, as filters (who may publish commands)."""
    return [_filter(fleet, "device", "+", "cmd"), _filter(fleet, "group", "+", "cmd"),
            _filter(fleet, "profile", "+", "cmd"), str(Topics(fleet).commands("all"))]


def render_acl(settings: BrokerSettings, devices: Sequence[DeviceSpec]) -> str:
    """mosquitto's acl_file. Usernames are certificate CNs; everything not granted is denied."""
    topics = Topics(settings.fleet)
    names = {d.id for d in devices}
    for role, name in (("operator", settings.operator), ("server", settings.server)):
        if name in names:
            raise BrokerConfigError(f"device id {name!r} is also the {role} identity; rename one of them")
    write, read = device_rights(settings.fleet)
    lines = [
        "# litefleet ACL for mosquitto (generated by `litefleet broker config`; regenerate, do not edit).",
        f"# Fleet {settings.fleet!r}. The username is the client certificate's CN (use_identity_as_username),",
        "# never the client id. Anything not granted below is denied.",
        "",
        "# Every identity, on its own name %u: a device reports on its own topics only and reads its",
        "# own commands.",
    ]
    lines += [f"pattern write {t}" for t in write]
    lines += [f"pattern read {t}" for t in read]
    lines += ["", "# Per device: fleet-wide, group and profile commands and the shared blob chunk streams."]
    for device in sorted(devices, key=lambda d: d.id):
        lines.append(f"user {device.id}")
        lines += [f"topic read {t}" for t in device_reads(settings.fleet, device)]
        lines.append("")
    lines += ["# The operator signs and publishes commands and watches the fleet.", f"user {settings.operator}"]
    lines += [f"topic write {t}" for t in command_filters(settings.fleet)]
    lines += [f"topic read {topics.all_devices(ch)}" for ch in ("status", "events", "telemetry")]
    lines += ["", "# The fleet server: repository (answers chunk requests with chunk streams), rollouts, telemetry.",
              f"user {settings.server}"]
    lines += [f"topic read {topics.all_devices(ch)}" for ch in ("status", "telemetry", "events", "chunkreq")]
    lines.append(f"topic write {topics.all_blobs()}")
    lines += [f"topic write {t}" for t in command_filters(settings.fleet)]
    return "\n".join(lines) + "\n"


def render_mosquitto_conf(settings: BrokerSettings, layout: Layout) -> str:
    """mosquitto.conf for 2.0.x: one TLS listener with client certificates, ACL, persistence."""
    s = settings
    listener = f"listener {s.port} {s.bind_address}".rstrip()
    user = [f"user {s.run_as}", ""] if s.run_as else []
    return "\n".join([
        "# litefleet broker configuration for mosquitto 2.0 (generated by `litefleet broker config`).",
        f"# Fleet {s.fleet!r}; chunk size {s.chunk_size} bytes. Paths are absolute: if you move this",
        "# directory, regenerate or rewrite them (mosquitto resolves relative paths from its cwd).",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {layout.acl}",
        *user,
        "# Chunks and telemetry are many small-to-mid writes: do not let Nagle delay them.",
        "set_tcp_nodelay true",
        "",
        "# One chunk plus headroom for its header, topic, MQTT 5 properties and the head message",
        "# (manifest + signature). MQTT 5 clients learn max_packet_size from CONNACK and cap their",
        "# chunk window with it; a bigger packet disconnects its sender (loudly, unlike",
        "# message_size_limit, which 2.0 deprecates and which drops silently for MQTT 3.1.1).",
        f"max_packet_size {s.max_packet_size}",
        "",
        "# Queues: mosquitto's default (1000 queued per client) silently drops QoS 1 messages for a",
        "# slow subscriber. No count limit; a per-client byte cap only so one dead persistent session",
        "# cannot exhaust the host's memory (0 would be unlimited).",
        "max_queued_messages 0",
        f"max_queued_bytes {s.max_queued_bytes}",
        "# Outgoing QoS 1/2 messages unacknowledged per client: enough to keep a link busy (MQTT 5",
        "# clients lower it with their Receive Maximum); beyond it messages wait in the queue above.",
        f"max_inflight_messages {s.max_inflight_messages}",
        "",
        "# Sessions, retained birth messages and queued messages survive a broker restart.",
        "persistence true",
        f"persistence_location {layout.data}",
        "autosave_interval 60",
        "",
        f"log_dest file {layout.log}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
        "# The only listener: TLS with a client certificate from our CA; its CN is the username.",
        listener,
        "protocol mqtt",
        f"cafile {layout.ca_cert}",
        f"certfile {layout.server_cert}",
        f"keyfile {layout.server_key}",
        "require_certificate true",
        "use_identity_as_username true",
        f"tls_version {s.tls_version}",
        "",
    ])


# Files (the edge) ---------------------------------------------------------------------------

@dataclass
class GenerateResult:
    """What :func:`generate` did: which certificates it issued and which it kept."""

    layout: Layout
    ca_reused: bool
    devices: list[DeviceSpec] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _write_issued(cert_path: Path, key_path: Path, issued: pki.Issued) -> None:
    write_private(key_path, issued.key_pem())  # key first: a cert without its key is useless
    atomic_write(cert_path, issued.cert_pem(), mode=0o644)


def _ensure_ca(layout: Layout, fleet: str, force: bool) -> tuple[pki.Issued, bool]:
    have_cert, have_key = layout.ca_cert.exists(), layout.ca_key.exists()
    if force or not (have_cert or have_key):
        ca = pki.make_ca(f"litefleet {fleet} broker CA", organization=_ca_organization(fleet))
        _write_issued(layout.ca_cert, layout.ca_key, ca)
        return ca, False
    if have_cert != have_key:
        missing = layout.ca_key if have_cert else layout.ca_cert
        raise BrokerConfigError(f"{missing} is missing but its pair exists: restore it, or pass --force to make "
                                f"a new CA (every device then needs a new certificate)")
    ca = pki.load_issued(layout.ca_cert, layout.ca_key)
    made_for = pki.organization(ca.cert)
    if made_for != _ca_organization(fleet):
        raise BrokerConfigError(f"{layout.ca_cert} was made for {made_for!r}, not fleet {fleet!r}: use another "
                                f"--output directory (or --force to replace the CA)")
    return ca, True


def _ca_organization(fleet: str) -> str:
    return f"litefleet {fleet}"


def _ensure_leaf(layout: Layout, result: GenerateResult, ca: pki.Issued, name: str, cert_path: Path,
                 key_path: Path, *, server: bool = False, hosts: Sequence[str] = ()) -> None:
    if cert_path.exists() and key_path.exists():
        existing = pki.load_issued(cert_path, key_path)
        if not pki.issued_by(existing.cert, ca.cert):
            raise BrokerConfigError(f"{cert_path} was not issued by {layout.ca_cert}; remove it to issue a new one, "
                                    f"or pass --force to renew everything")
        if pki.common_name(existing.cert) != name:
            raise BrokerConfigError(f"{cert_path} is for {pki.common_name(existing.cert)!r}, not {name!r}; remove it")
        if not server or set(hosts) <= pki.san_names(existing.cert):
            result.kept.append(name)
            return
        # a server certificate missing a newly given host name is re-issued (same CA: clients keep working)
    _write_issued(cert_path, key_path, pki.issue(ca, name, server=server, hosts=hosts))
    result.issued.append(name)


def generate(out_dir: Path, settings: BrokerSettings, devices: Sequence[DeviceSpec],
             force: bool = False) -> GenerateResult:
    """Write the CA, server, operator, server-identity and device certificates, mosquitto.conf and acl.

    An existing CA is reused and only missing certificates are issued; devices recorded in
    ``devices.toml`` by earlier runs stay in the ACL (so adding a device means naming only
    it). ``force`` makes a new CA and re-issues every certificate, for every recorded device too.
    """
    layout = Layout(Path(out_dir))
    given = merge_devices(devices)
    recorded = load_devices_file(layout.devices) if layout.devices.exists() else []
    devices = with_recorded(recorded, given)
    acl_text = render_acl(settings, devices)  # validate names before writing anything
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.clients.mkdir(exist_ok=True)
    layout.data.mkdir(exist_ok=True)
    ca, reused = _ensure_ca(layout, settings.fleet, force)
    result = GenerateResult(layout, ca_reused=reused, devices=devices)
    if force:
        for path in (layout.server_cert, *layout.clients.glob("*.crt")):
            path.unlink()
    _ensure_leaf(layout, result, ca, "server", layout.server_cert, layout.server_key,
                 server=True, hosts=settings.server_hosts)
    for name in (settings.operator, settings.server, *(d.id for d in devices)):
        _ensure_leaf(layout, result, ca, name, layout.client_cert(name), layout.client_key(name))
    atomic_write(layout.devices, render_devices_toml(devices).encode(), mode=0o644)
    atomic_write(layout.acl, acl_text.encode(), mode=0o644)
    atomic_write(layout.conf, render_mosquitto_conf(settings, layout).encode(), mode=0o644)
    return result


__all__ = ["BrokerConfigError", "BrokerSettings", "DeviceSpec", "GenerateResult", "Layout",
           "command_filters", "device_reads", "device_rights", "generate", "load_devices_file", "merge_devices",
           "parse_device_spec", "parse_devices_toml", "render_acl", "render_devices_toml", "render_mosquitto_conf",
           "with_recorded"]
