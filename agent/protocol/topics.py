"""Every MQTT topic litefleet uses, in one place, as typed values with matching.

Layout under one versioned prefix, ``lf/v1/{fleet}/``::

    device/{id}/status      retained birth message; the last will marks the device offline
    device/{id}/telemetry   telemetry documents (QoS 1, in order, with sequence numbers)
    device/{id}/events      install and health events
    device/{id}/chunkreq    the device asks the repository for chunks of a blob
    device/{id}/cmd         signed commands for one device
    group/{name}/cmd        signed commands for a group
    profile/{name}/cmd      signed commands for every device of a profile
    all/cmd                 signed commands for the whole fleet
    blob/{blob_id}/chunks   the one chunk stream of a blob, shared by every device fetching it
                            (blob id: sha256 of the signed manifest.json bytes)

Identifiers are restricted to ``[A-Za-z0-9._-]`` so that no id can contain ``/``, ``+`` or
``#`` and reach into another device's topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOL_VERSION = 1
PREFIX = f"lf/v{PROTOCOL_VERSION}"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

DEVICE_CHANNELS = ("status", "telemetry", "events", "chunkreq", "cmd")
SCOPES = ("device", "group", "profile", "all")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe identifier, else raise ValueError naming ``kind``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 letters, digits, '.', '_' or '-' (no '/', '+', '#')")
    return value


@dataclass(frozen=True)
class Topic:
    """A parsed litefleet topic. ``scope`` is device/group/profile/all/blob; ``name`` its id."""

    fleet: str
    scope: str
    name: str
    channel: str

    def __str__(self) -> str:
        if self.scope == "all":
            return f"{PREFIX}/{self.fleet}/all/{self.channel}"
        return f"{PREFIX}/{self.fleet}/{self.scope}/{self.name}/{self.channel}"


@dataclass(frozen=True)
class Topics:
    """The topics of one fleet."""

    fleet: str

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)

    def device(self, device_id: str, channel: str) -> Topic:
        if channel not in DEVICE_CHANNELS:
            raise ValueError(f"unknown device channel {channel!r}")
        return Topic(self.fleet, "device", check_id("device id", device_id), channel)

    def status(self, device_id: str) -> Topic:
        return self.device(device_id, "status")

    def telemetry(self, device_id: str) -> Topic:
        return self.device(device_id, "telemetry")

    def events(self, device_id: str) -> Topic:
        return self.device(device_id, "events")

    def chunk_requests(self, device_id: str) -> Topic:
        return self.device(device_id, "chunkreq")

    def commands(self, scope: str, name: str = "") -> Topic:
        """Command topic for a target: ('device', id), ('group', g), ('profile', p) or ('all',)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown command scope {scope!r}; use one of {', '.join(SCOPES)}")
        if scope == "all":
            return Topic(self.fleet, "all", "", "cmd")
        return Topic(self.fleet, scope, check_id(scope, name), "cmd")

    def blob_chunks(self, sha256: str) -> Topic:
        if not _SHA256.match(sha256):
            raise ValueError(f"blob id {sha256!r} must be a lowercase hex sha256")
        return Topic(self.fleet, "blob", sha256, "chunks")

    # Subscription filters -------------------------------------------------------------

    def device_subscriptions(self, device_id: str, groups: tuple[str, ...], profile: str) -> list[str]:
        """What a device listens to: its own, its groups', its profile's and fleet-wide commands."""
        filters = [str(self.commands("device", device_id)), str(self.commands("all"))]
        filters += [str(self.commands("group", g)) for g in groups]
        filters.append(str(self.commands("profile", profile)))
        return filters

    def all_devices(self, channel: str) -> str:
        """A filter for one channel of every device (for the server)."""
        if channel not in DEVICE_CHANNELS:
            raise ValueError(f"unknown device channel {channel!r}")
        return f"{PREFIX}/{self.fleet}/device/+/{channel}"

    def all_blobs(self) -> str:
        return f"{PREFIX}/{self.fleet}/blob/+/chunks"


def parse(topic: str) -> Topic | None:
    """Parse a concrete topic; None when it is not a litefleet topic of this protocol version."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    fleet = parts[2]
    if not _ID.match(fleet):
        return None
    if len(parts) == 5 and parts[3] == "all" and parts[4] == "cmd":
        return Topic(fleet, "all", "", "cmd")
    if len(parts) != 6:
        return None
    scope, name, channel = parts[3], parts[4], parts[5]
    if scope == "device" and channel in DEVICE_CHANNELS and _ID.match(name):
        return Topic(fleet, scope, name, channel)
    if scope in ("group", "profile") and channel == "cmd" and _ID.match(name):
        return Topic(fleet, scope, name, channel)
    if scope == "blob" and channel == "chunks" and _SHA256.match(name):
        return Topic(fleet, scope, name, channel)
    return None
