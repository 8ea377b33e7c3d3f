"""Pushing signed commands to devices and following what each device does with them.

The split: :func:`parse_target`, :func:`next_seq`, :func:`deploy_args` and :class:`Progress`
are pure (no sockets, no clock unless passed in) and unit-tested; :func:`publish_command` and
:func:`follow` are the MQTT edge.

Commands are published **retained** at QoS 1 on the target's command topic, so a device that
is offline gets the latest command for its topic when it returns (within the command's TTL;
over MQTT 5 the broker also drops it after the TTL). A device ignores a retained command it
has already acted on, quietly.

Which devices a command reaches is learnt from the retained status messages on
``device/+/status``: the birth (and the offline message) carries the device's groups and
profile. What they do is learnt from ``device/+/events`` whose ``command_id`` is the command's id.

Sequence numbers are time based: microseconds since the epoch, made strictly increasing
within a process. No state file is needed on the operator's machine, and two operators (or
two machines of one operator) never go backwards as long as their clocks are roughly right.
Devices do not require seq order anyway (replays are caught by the command id).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import messages
from agent.protocol.bundle import blob_id
from agent.protocol.errors import LitefleetError
from agent.protocol.manifest import Manifest
from agent.protocol.topics import SCOPES, Topics, check_id

# (success kinds, failure kinds) per action: the events that end a device's part in a command.
FINAL_EVENTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "deploy": (frozenset({"installed"}), frozenset({"deploy_rejected", "install_failed"})),
    "rollback": (frozenset({"rolled_back", "rollback_skipped"}), frozenset({"deploy_rejected", "install_failed"})),
    "config": (frozenset({"config_applied"}), frozenset({"deploy_rejected"})),
}
EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2
DEFAULT_SETTLE_S = 1.0   # time for the broker's retained status messages to arrive after SUBACK


class PushError(LitefleetError):
    """A command cannot be built or sent as asked."""


# --- pure parts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scope: str   # device | group | profile | all
    name: str = ""

    def __str__(self) -> str:
        return "all" if self.scope == "all" else f"{self.scope}:{self.name}"


def parse_target(text: str) -> Target:
    """``device:ID``, ``group:NAME``, ``profile:NAME`` or ``all``."""
    text = text.strip()
    if text == "all":
        return Target("all")
    scope, sep, name = text.partition(":")
    if not sep or scope not in SCOPES or scope == "all":
        raise ValueError(f"target {text!r} must be device:ID, group:NAME, profile:NAME or all")
    try:
        check_id(scope, name)
    except ValueError as exc:
        raise ValueError(f"target {text!r}: {exc}") from None
    return Target(scope, name)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``1h``, ``2d`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"duration {text!r} must be a number with an optional unit ms/s/m/h/d, e.g. 10m")
    return float(match.group(1)) * _UNITS[match.group(2)]


_seq_lock = threading.Lock()
_last_seq = 0


def next_seq(now: float | None = None) -> int:
    """A time-based sequence number: microseconds since the epoch, strictly increasing per process."""
    global _last_seq
    value = int((time.time() if now is None else now) * 1_000_000)
    with _seq_lock:
        _last_seq = max(value, _last_seq + 1)
        return _last_seq


def deploy_args(manifest: Manifest, manifest_bytes: bytes) -> dict[str, Any]:
    """The ``args`` of a deploy command for a verified bundle.

    ``blob`` is the hash of the signed manifest (what the repository serves it under, and what the
    device checks the head it receives against); ``model_sha256`` is the model's, for people and logs.
    """
    return {"blob": blob_id(manifest_bytes), "name": manifest.name, "version": manifest.version,
            "profile": manifest.profile, "model_sha256": manifest.sha256}


def matches(target: Target, status: dict[str, Any]) -> bool:
    """Whether a device whose status message is ``status`` is addressed by ``target``."""
    if target.scope == "all":
        return True
    if target.scope == "device":
        return status.get("device_id") == target.name
    if target.scope == "group":
        return target.name in (status.get("groups") or [])
    return status.get("profile") == target.name


@dataclass
class DeviceRow:
    """What one target device has done with the command so far."""

    device_id: str
    state: str = "waiting"        # waiting | accepted | fetching | installed/rolled_back/config_applied | rejected | failed
    online: bool | None = None    # None: no status message seen
    percent: int | None = None
    detail: str = ""
    final: bool = False
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "state": self.state, "online": self.online, "percent": self.percent,
                "detail": self.detail, "final": self.final, "ok": self.ok}


@dataclass
class Progress:
    """Per-device progress of one command, from status messages and events. No I/O."""

    target: Target
    command_id: str
    action: str
    rows: dict[str, DeviceRow] = field(default_factory=dict)
    changes: int = 0

    def __post_init__(self) -> None:
        if self.target.scope == "device":
            self.rows[self.target.name] = DeviceRow(self.target.name)

    def on_status(self, doc: dict[str, Any]) -> bool:
        """A status message (birth or offline); True when it changed the table."""
        device = doc.get("device_id")
        if not isinstance(device, str) or not matches(self.target, doc):
            return False
        row = self.rows.get(device)
        if row is None:
            row = self.rows[device] = DeviceRow(device)
        online = doc.get("state") == "online"
        if row.online == online:
            return False
        row.online = online
        self.changes += 1
        return True

    def on_event(self, doc: dict[str, Any]) -> bool:
        """An event; True when it was about this command and changed the table."""
        if doc.get("command_id") != self.command_id:
            return False
        device = doc["device_id"]
        row = self.rows.get(device)
        if row is None:  # acted on it, so it is a target even if its status was never seen
            row = self.rows[device] = DeviceRow(device, online=True)
        if row.final:
            return False
        ok_kinds, bad_kinds = FINAL_EVENTS[self.action]
        kind, details = doc.get("kind", ""), doc.get("details") or {}
        if kind in ok_kinds:
            row.state, row.final, row.ok, row.detail = kind, True, True, doc.get("reason", "")
            if self.action == "deploy":
                row.percent = 100
        elif kind in bad_kinds:
            row.state = "rejected" if kind == "deploy_rejected" else "failed"
            row.final = True
            code = details.get("code", "")
            row.detail = f"{code}: {doc.get('reason', '')}" if code else doc.get("reason", "")
        elif kind == "deploy_accepted":
            row.state = "accepted"
        elif kind == "deploy_progress":
            row.state = "fetching"
            if isinstance(details.get("percent"), int):
                row.percent = details["percent"]
            row.detail = doc.get("reason", "")
        else:
            row.detail = f"{kind}: {doc.get('reason', '')}"
        self.changes += 1
        return True

    @property
    def done(self) -> bool:
        return bool(self.rows) and all(r.final for r in self.rows.values())

    def unanswered(self) -> list[str]:
        return sorted(d for d, r in self.rows.items() if not r.final)

    def exit_code(self) -> int:
        if not self.done:
            return EXIT_TIMEOUT
        return EXIT_OK if all(r.ok for r in self.rows.values()) else EXIT_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "action": self.action, "target": str(self.target),
                "done": self.done, "devices": [r.to_dict() for _, r in sorted(self.rows.items())]}


# --- the MQTT edge --------------------------------------------------------------------------------


def command_topic(topics: Topics, target: Target) -> str:
    return str(topics.commands(target.scope, target.name))


def publish_command(link: Any, topics: Topics, target: Target, command: dict[str, Any], *,
                    ttl_s: float, retain: bool = True, ack_timeout_s: float = 15.0) -> str:
    """Publish ``command`` (QoS 1) and wait for the broker's acknowledgement; return the topic."""
    topic = command_topic(topics, target)
    token = link.publish(topic, messages.encode(command), qos=1, retain=retain, expiry_s=max(1, int(ttl_s)))
    if not token.wait(ack_timeout_s):
        raise PushError(f"the broker did not acknowledge the command on {topic} within {ack_timeout_s:g}s "
                        f"({link.last_error or 'connection lost?'}); it may or may not have been delivered")
    if token.refused:
        raise PushError(f"the broker refused the command on {topic}: {token.refused}; does this identity "
                        f"(--cert) have the operator's rights in the broker's ACL?")
    return topic


def watch_fleet(link: Any, topics: Topics, progress: Progress, on_change: Callable[[], None],
                lock: threading.Lock) -> None:
    """Subscribe to status and events, feeding ``progress`` (under ``lock``); wait for the SUBACKs."""
    def status(message: Any) -> None:
        if not message.payload:
            return
        try:
            doc = messages.decode(message.payload, "status", message.topic)
        except messages.MessageError:
            return
        with lock:
            changed = progress.on_status(doc)
        if changed:
            on_change()

    def event(message: Any) -> None:
        try:
            doc = messages.decode(message.payload, "events", message.topic)
        except messages.MessageError:
            return
        with lock:
            changed = progress.on_event(doc)
        if changed:
            on_change()

    tokens = [link.subscribe(topics.all_devices("events"), event, qos=1),
              link.subscribe(topics.all_devices("status"), status, qos=1)]
    for token in tokens:
        if not token.wait(15.0):
            raise PushError(f"cannot watch the fleet: subscription refused or not acknowledged "
                            f"({token.refused or 'timeout'}); the operator identity needs read access to "
                            f"device/+/status and device/+/events")


def follow(progress: Progress, lock: threading.Lock, changed: threading.Event, *, timeout_s: float,
           settle_s: float = DEFAULT_SETTLE_S, render: Callable[[], None] = lambda: None,
           clock: Callable[[], float] = time.monotonic) -> int:
    """Wait until every target device finished (or ``timeout_s``); return the exit code.

    Not done before ``settle_s``: retained status messages naming more targets may still come.
    """
    start = clock()
    while True:
        render()
        now = clock()
        with lock:
            done = progress.done
        if done and now - start >= settle_s:
            return progress.exit_code()
        if now - start >= timeout_s:
            return EXIT_TIMEOUT
        changed.wait(min(0.5, max(0.01, start + timeout_s - now)))
        changed.clear()


__all__ = ["Target", "parse_target", "parse_duration", "next_seq", "deploy_args", "matches", "DeviceRow",
           "Progress", "PushError", "publish_command", "watch_fleet", "follow", "command_topic",
           "FINAL_EVENTS", "EXIT_OK", "EXIT_FAILED", "EXIT_TIMEOUT"]
