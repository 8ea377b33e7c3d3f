"""sd_notify against real AF_UNIX datagram sockets, standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier, systemd_credential, watchdog_interval_from
from tests.conftest import ROOT


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


@pytest.fixture
def path_socket(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"litefleet-test-{uuid.uuid4().hex}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_ready_status_watchdog_stopping_reach_a_path_socket(path_socket):
    sock, path = path_socket
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving digits v3")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving digits v3"}
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("installing digits v4\nsecond line")
    assert _fields(sock.recv(4096)) == {"STATUS": "installing digits v4 second line"}
    assert n.extend_timeout(2.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_namespace_socket(abstract_socket):
    sock, name = abstract_socket
    n = Notifier(env={"NOTIFY_SOCKET": name})
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"


def test_a_separate_process_notifies_through_the_environment(abstract_socket):
    """The daemon reads NOTIFY_SOCKET from its environment, as it does under systemd."""
    sock, name = abstract_socket
    code = "from agent.notify import Notifier; import sys; sys.exit(0 if Notifier().ready('up') else 3)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": name}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == 0
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "up"}


def test_no_op_without_notify_socket():
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_send_to_a_vanished_socket_does_not_raise(tmp_path, caplog):
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.watchdog() is False
    assert n.watchdog() is False
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_unsupported_address_is_disabled():
    assert not Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_interval_respects_watchdog_pid():
    assert watchdog_interval_from({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_from({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_from({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_from({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_from({"WATCHDOG_USEC": "soon"}) is None
    assert Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "5000000"}).watchdog_interval() == 5.0


def test_systemd_credential(tmp_path: Path):
    (tmp_path / "device.key").write_text("k")
    assert systemd_credential("device.key", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == tmp_path / "device.key"
    assert systemd_credential("other.key", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    assert systemd_credential("device.key", {}) is None
    assert systemd_credential("../device.key", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
