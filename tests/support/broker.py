"""A real mosquitto child process on a free port, for tests.

Tests must never touch the system broker on 1883: each ``Mosquitto`` runs its own
``mosquitto -c CONF`` with the caller's configuration, on a port found by binding port 0.
Between finding a free port and mosquitto binding it another process may take it; the broker
then exits at once and we retry with a fresh port.

Usage::

    from tests.support.broker import Mosquitto, plain_config, mosquitto_factory  # fixture

    def test_x(mosquitto_factory):
        broker = mosquitto_factory()                     # plain, anonymous, 127.0.0.1
        tls = mosquitto_factory(lambda port: my_tls_conf(port))
        ...  broker.port, broker.url, broker.kill(), broker.restart(), broker.log

The configuration is either a callable ``config(port) -> str`` returning the whole file
(it must contain the ``listener PORT ...`` line), or a string *body* to which the class
prepends ``listener PORT 127.0.0.1`` (so listener options such as ``cafile`` in the body apply
to that listener). In both cases the class appends what it owns: persistence in its work dir,
``log_dest file`` (read back with ``.log``) and, when running as root, ``user root`` so that
mosquitto does not drop to a user who cannot write the work dir.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

MOSQUITTO = os.environ.get("LITEFLEET_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
HOST = "127.0.0.1"



class BrokerError(RuntimeError):
    """The test broker did not start; the message carries mosquitto's output and log."""


def free_port(host: str = HOST) -> int:
    """A port the kernel just gave us for port 0 (free now, maybe not in a millisecond)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def plain_config(port: int, extra: str = "") -> str:
    """A plain TCP, anonymous configuration that never drops QoS 1 messages.

    mosquitto's defaults (20 inflight, 1000 queued per client) silently drop QoS 1 messages
    for a slow subscriber; 0 means unlimited for both (accepted by 2.0.11).
    """
    return (
        f"listener {port} {HOST}\n"
        "allow_anonymous true\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "set_tcp_nodelay true\n"
        f"{extra}\n"
    )


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """One mosquitto child process; a context manager that stops it on exit."""

    def __init__(self, config: "str | Callable[[int], str] | None" = None, workdir: Path | None = None,
                 *, host: str = HOST, ready_timeout: float = 10.0, attempts: int = 5) -> None:
        self._config = config if config is not None else plain_config
        self._own_tmp: tempfile.TemporaryDirectory | None = None
        if workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="lf-mosquitto-")
            workdir = Path(self._own_tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.host = host
        self.ready_timeout = ready_timeout
        self.attempts = attempts
        self.port: int = 0
        self.proc: subprocess.Popen | None = None
        self.failed_attempts: list[str] = []  # why earlier start attempts failed (diagnostics)

    # -- configuration -------------------------------------------------------------------
    def _render(self, port: int) -> str:
        if callable(self._config):
            text = self._config(port)
        else:
            text = f"listener {port} {self.host}\n{self._config}\n"
        owned = [
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            owned.append("user root")
        return text.rstrip("\n") + "\n\n# added by tests/support/broker.py\n" + "\n".join(owned) + "\n"

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        """The broker's log so far (for assertions such as 'client X disconnected')."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> "Mosquitto":
        """Start on a fresh free port, or on the same port when it was started before."""
        if self.running:
            return self
        if self.port:
            self._launch(self.port)  # a restart keeps its port; mosquitto sets SO_REUSEADDR
            return self
        last = ""
        for _ in range(self.attempts):
            port = free_port(self.host)
            try:
                self._launch(port)
                return self
            except BrokerError as exc:  # most likely the port was taken in between: retry
                last = str(exc)
                self.failed_attempts.append(last)
        raise BrokerError(f"mosquitto did not start after {self.attempts} attempts: {last}")

    def _launch(self, port: int) -> None:
        self.conf_path.write_text(self._render(port))
        log_start = len(self.log)  # before Popen: mosquitto may log its listener at once
        out = open(self.workdir / "stdout.txt", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            # the listener line is logged once it is bound: a port taken by another process
            # in the race answers the probe too, but then mosquitto exits instead.
            if f"listen socket on port {port}" in self.log[log_start:] and _port_open(self.host, port) \
                    and self.proc.poll() is None:
                self.port = port
                return
            time.sleep(0.02)  # polling interval of a deadline loop, not synchronisation
        self._terminate(signal.SIGKILL)
        stdout = (self.workdir / "stdout.txt").read_text(errors="replace")
        raise BrokerError(f"mosquitto on port {port} not ready (config {self.conf_path}):\n"
                          f"{stdout[-2000:]}\n{self.log[-2000:]}")

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence database and closes connections."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash. Nothing is saved since the last autosave."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> "Mosquitto":
        """Stop (or kill) and start again on the same port with the same persistence dir."""
        self.kill() if kill else self.stop()
        return self.start()

    def close(self) -> None:
        self.kill()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mosquitto({self.url}, running={self.running}, workdir={self.workdir})"


@pytest.fixture
def mosquitto_factory(tmp_path_factory) -> Iterator[Callable[..., Mosquitto]]:
    """A factory fixture: ``mosquitto_factory(config=None) -> started Mosquitto``; all stopped at teardown.

    Import it into a test module (``from tests.support.broker import mosquitto_factory``).
    """
    brokers: list[Mosquitto] = []

    def make(config: "str | Callable[[int], str] | None" = None, **kwargs) -> Mosquitto:
        broker = Mosquitto(config, tmp_path_factory.mktemp("mosquitto"), **kwargs)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def mosquitto(mosquitto_factory) -> Mosquitto:
    """A plain anonymous broker on 127.0.0.1 and a free port (see ``plain_config``)."""
    return mosquitto_factory()
