"""sd_notify spoken directly: readiness, status and watchdog pings to systemd.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Doing it ourselves keeps the
agent free of libsystemd bindings; outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op,
so the daemon can call it unconditionally. A failed send is logged once and never raises: losing
a status line must not take the agent down (a missed watchdog ping will, which is the point).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None when we cannot speak to it."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None   # e.g. "vsock:..." (VMs); not used on the devices we target


def _clean(value: str) -> str:
    """A field value on one line: a newline would start a new (bogus) field."""
    return " ".join(str(value).splitlines())


def watchdog_interval_from(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds systemd set for *this* process, or None.

    ``$WATCHDOG_PID``, when present, names the process the timeout is meant for: a child that
    inherited the environment must not think it is being watched.
    """
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    watched_pid = env.get("WATCHDOG_PID", "").strip()
    if watched_pid:
        try:
            if int(watched_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1_000_000 if value > 0 else None


class Notifier:
    """Tells systemd how the agent is doing. Safe to share between threads."""

    def __init__(self, socket_path: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        raw = socket_path if socket_path is not None else self._env.get("NOTIFY_SOCKET", "")
        self.socket_path = raw or None
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notifications are off", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls) -> Notifier:
        return cls()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one datagram. True if systemd got it (or nothing to do: False)."""
        if self._address is None:
            return False
        payload = "\n".join(f"{key}={_clean(str(value))}" for key, value in fields.items()).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd through %s: %s", self.socket_path, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        """The agent is serving: systemd finishes ``start`` (Type=notify) and starts the watchdog."""
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; call at least every ``watchdog_interval() / 2`` seconds."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (a slow model load), beyond TimeoutStartSec=."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout (seconds) for this process, or None when there is no watchdog."""
        return watchdog_interval_from(self._env)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def systemd_credential(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` if systemd passed that credential (LoadCredential=), else None.

    The unit hands the device's TLS key over this way (``device.key``) so the key file on disk can
    stay readable by root only.
    """
    directory = (os.environ if env is None else env).get("CREDENTIALS_DIRECTORY")
    if not directory or "/" in name:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None
