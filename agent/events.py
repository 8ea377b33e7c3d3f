"""Events: what happened on the device, with a reason a person can act on.

The install pipeline, the runtime and the health watch emit events into an :class:`EventSink`;
the daemon spools them and the MQTT transport publishes them. Tests collect them in a list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# The kinds of event, one place; docs/protocol.md documents each.
DEPLOY_ACCEPTED = "deploy_accepted"
DEPLOY_PROGRESS = "deploy_progress"
DEPLOY_REJECTED = "deploy_rejected"
INSTALLED = "installed"
INSTALL_FAILED = "install_failed"
ROLLED_BACK = "rolled_back"
ROLLBACK_SKIPPED = "rollback_skipped"
DELEGATE_FALLBACK = "delegate_fallback"
ACCELERATOR_MISMATCH = "accelerator_mismatch"
HEALTH_BREACH = "health_breach"
AGENT_STARTED = "agent_started"
CONFIG_APPLIED = "config_applied"


@dataclass(frozen=True)
class Event:
    kind: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EventSink = Callable[[Event], None]


class EventLog:
    """An in-memory sink that keeps every event, for tests and for ``status``."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def discard(event: Event) -> None:
    """A sink that drops events."""
