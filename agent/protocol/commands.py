"""Signed commands: how an operator's deploy, rollback and config commands are made and checked.

A command is ``{"v": 1, "body": {...}, "signature": {...}}``; the signature is an operator
key's Ed25519 signature over the body's canonical JSON. :class:`CommandGuard` decides, with no
I/O, whether a device may act on one: it rejects anything unsigned, badly signed, expired,
replayed, meant for another fleet or device, or naming a bundle for another profile. The
device persists the guard's memory (:meth:`CommandGuard.to_dict`) so a replay is caught
after a restart too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import LitefleetError, SchemaError, SignatureError
from .keys import PublicKey
from .messages import COMMAND_BODY, MESSAGE_VERSION, command_signed_bytes
from .schema import validate
from .signing import sign
from .signing import verify as verify_signature

MAX_LIFETIME_S = 7 * 86400   # a device refuses commands that claim to be valid for longer
CLOCK_SKEW_S = 300           # issued_at may be this far in the device's future


class CommandRejected(LitefleetError):
    """A command the device must not act on. ``code`` is stable; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class Identity:
    """Who a device is, for addressing."""

    device_id: str
    fleet: str
    groups: tuple[str, ...]
    profile: str


def make_command(action: str, args: dict[str, Any], *, fleet: str, scope: str, name: str,
                 operator_key: Ed25519PrivateKey, seq: int, ttl_s: float = 3600,
                 now: float | None = None, command_id: str | None = None) -> dict[str, Any]:
    """A signed command ready to publish."""
    now = time.time() if now is None else now
    body = {
        "v": MESSAGE_VERSION, "id": command_id or uuid.uuid4().hex, "seq": seq, "fleet": fleet,
        "issued_at": now, "expires_at": now + ttl_s,
        "target": {"scope": scope, "name": name if scope != "all" else ""},
        "action": action, "args": args,
    }
    validate(body, COMMAND_BODY, "command")
    return {"v": MESSAGE_VERSION, "body": body, "signature": sign(command_signed_bytes(body), operator_key)}


@dataclass(frozen=True)
class CheckedCommand:
    """A command that passed every check; ``signer`` is the operator key's id."""

    body: dict[str, Any]
    signer: str

    @property
    def action(self) -> str:
        return self.body["action"]

    @property
    def args(self) -> dict[str, Any]:
        return self.body["args"]

    @property
    def id(self) -> str:
        return self.body["id"]


@dataclass
class CommandGuard:
    """Checks commands for one device and remembers which it has accepted."""

    identity: Identity
    seen: dict[str, float] = field(default_factory=dict)      # command id -> its expiry
    last_seq: dict[str, int] = field(default_factory=dict)    # operator key id -> highest seq accepted

    def check(self, command: Any, trusted: Iterable[PublicKey], now: float | None = None) -> "CheckedCommand":
        """Return the command if the device may act on it, else raise CommandRejected.

        Replays are caught by the command's id, remembered until the command expires (after
        which it is refused as expired anyway). Sequence numbers are not required to arrive in
        order: retained commands on several topics come back in any order after a reconnect.
        """
        now = time.time() if now is None else now
        if not isinstance(command, dict) or "body" not in command:
            raise CommandRejected("malformed", "command is not an object with a body")
        if not command.get("signature"):
            raise CommandRejected("unsigned", "command is not signed")
        body = command["body"]
        try:
            body = validate(body, COMMAND_BODY, "command")
        except SchemaError as exc:
            raise CommandRejected("malformed", f"command does not match its schema: {exc}") from None
        try:
            signer = verify_signature(command_signed_bytes(command["body"]), command["signature"], trusted,
                                      role="operator", what="command")
        except SignatureError as exc:
            raise CommandRejected("bad_signature", str(exc)) from None
        self._check_time(body, now)
        self._check_address(body)
        if body["id"] in self.seen:
            raise CommandRejected("replayed", f"command {body['id']} was already accepted; a replay is ignored")
        return CheckedCommand(body, signer.key_id)

    def accept(self, checked: "CheckedCommand", now: float | None = None) -> None:
        """Remember a command the device acted on, so a replay of it is refused."""
        now = time.time() if now is None else now
        body = checked.body
        self.seen[body["id"]] = body["expires_at"]
        self.last_seq[checked.signer] = max(body["seq"], self.last_seq.get(checked.signer, -1))
        self.seen = {cid: exp for cid, exp in self.seen.items() if exp >= now}

    def _check_time(self, body: dict[str, Any], now: float) -> None:
        if body["expires_at"] < now:
            raise CommandRejected("expired", f"command expired {now - body['expires_at']:.0f} s ago")
        if body["issued_at"] > now + CLOCK_SKEW_S:
            raise CommandRejected("not_yet_valid", "command is issued in the future; check the device's clock")
        if body["expires_at"] - body["issued_at"] > MAX_LIFETIME_S:
            raise CommandRejected("malformed", f"command lifetime exceeds {MAX_LIFETIME_S} s")

    def _check_address(self, body: dict[str, Any]) -> None:
        me = self.identity
        if body["fleet"] != me.fleet:
            raise CommandRejected("misaddressed", f"command is for fleet {body['fleet']!r}, this device is in {me.fleet!r}")
        scope, name = body["target"]["scope"], body["target"]["name"]
        addressed = (scope == "all" or (scope == "device" and name == me.device_id)
                     or (scope == "group" and name in me.groups) or (scope == "profile" and name == me.profile))
        if not addressed:
            raise CommandRejected("misaddressed", f"command is for {scope} {name!r}, not this device")
        bundle_profile = body["args"].get("profile")
        if body["action"] == "deploy" and bundle_profile != me.profile:
            raise CommandRejected("wrong_profile", f"deploy names a bundle for profile {bundle_profile!r}; "
                                                   f"this device runs {me.profile!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "last_seq": self.last_seq}

    @classmethod
    def from_dict(cls, identity: Identity, doc: dict[str, Any]) -> "CommandGuard":
        return cls(identity, dict(doc.get("seen", {})), {k: int(v) for k, v in doc.get("last_seq", {}).items()})
