"""The agent daemon end to end: a real process, real sockets, real installs and rollbacks."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from agent.commands.predict import ApiClient
from agent.config import load_config
from agent.spool import Spool
from tests.conftest import run_cli
from tests.support.agents import AgentProcess, make_device, wait_for
from tests.support.bundles import make_bundle


@pytest.fixture
def notify_socket(tmp_path):
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(60)
    yield path, sock
    sock.close()


def _datagrams(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if any(until in g for g in got):
            return got
    raise AssertionError(f"no {until!r} from the agent; got {got}")


def _predict(device, image: np.ndarray) -> np.ndarray:
    client = ApiClient(unix_socket=str(device.socket))
    doc = client.json("POST", "/v1/models/digits:predict", json.dumps({"instances": [image.tolist()]}).encode(),
                      {"Content-Type": "application/json"})
    return np.asarray(doc["predictions"][0])


def test_agent_process_serves_its_model_tells_systemd_and_spools_telemetry(
        tmp_path, keys_dir, release_key, digits_tflite_int8, digits, notify_socket):
    device = make_device(tmp_path / "dev", keys_dir, telemetry_interval_s=0.5)
    bundle = make_bundle(tmp_path / "v1.lfb", digits_tflite_int8, release_key, version=1, mode="int8")
    installed = run_cli("agent", "install-bundle", str(bundle), "--config", str(device.config))
    assert installed.returncode == 0, installed.stderr

    path, sock = notify_socket
    agent = AgentProcess(device, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
    try:
        messages = _datagrams(sock, "READY=1", timeout=90)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=serving digits v1" in ready
        assert any("WATCHDOG=1" in m for m in _datagrams(sock, "WATCHDOG=1", timeout=10))

        _, _, x_test, y_test = digits
        predictions = [int(np.argmax(_predict(device, x_test[i]))) for i in range(40)]
        assert np.mean(np.array(predictions) == y_test[:40]) > 0.85

        wait_for(lambda: (device.status().get("telemetry") or {}).get("inference", {}).get("count"),
                 20, "a telemetry interval that counted the inferences")
        status = run_cli("agent", "status", "--config", str(device.config), "--json")
        info = json.loads(status.stdout)
        assert info["daemon"] == "running"
        assert info["snapshot"]["model"]["version"] == 1
        assert info["snapshot"]["engine"]["delegate"] == "xnnpack"
        assert info["snapshot"]["engine"]["threads"] == 2
        human = run_cli("agent", "status", "--config", str(device.config)).stdout
        assert "active model:   digits v1" in human and "delegate xnnpack" in human

        # With the daemon running, install-bundle hands the file over and the daemon switches.
        v2 = make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2, mode="int8")
        upgraded = run_cli("agent", "install-bundle", str(v2), "--config", str(device.config), "--json")
        assert upgraded.returncode == 0, upgraded.stderr
        assert json.loads(upgraded.stdout)["via"] == "daemon"
        answer = ApiClient(unix_socket=str(device.socket)).json(
            "POST", "/v1/models/digits:predict", json.dumps({"instances": [x_test[0].tolist()]}).encode())
        assert answer["model_version"] in (2, "2")
        again = run_cli("agent", "install-bundle", str(v2), "--config", str(device.config))
        assert again.returncode == 1 and "not_newer" in again.stderr
    finally:
        assert agent.stop() == 0, agent.log()
    assert any("STOPPING=1" in m for m in _datagrams(sock, "STOPPING=1", timeout=10))
    with Spool(device.state / "spool.sqlite") as spool:
        rows = spool.peek(1000)
    kinds = {kind for _, kind, _ in rows}
    assert {"telemetry", "events"} <= kinds
    seqs = [doc["seq"] for _, _, doc in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_invalid_config_exits_78_naming_the_key(tmp_path, keys_dir):
    device = make_device(tmp_path / "dev", keys_dir, extra="telemetry_intervall_s = 3")
    result = run_cli("agent", "run", "--config", str(device.config))
    assert result.returncode == 78
    assert "telemetry_intervall_s" in result.stderr and "did you mean 'telemetry_interval_s'" in result.stderr


def test_health_breach_after_install_rolls_back_while_serving(tmp_path, keys_dir, release_key,
                                                               digits_tflite_int8, digits_tflite_float, digits):
    """A model that answers but breaks its latency bound is replaced by the previous one."""
    from agent.daemon import AgentDaemon
    device = make_device(tmp_path / "dev", keys_dir,
                         health="window_s = 60.0\nmin_requests = 5\nmax_error_rate = 0.5\nmax_p95_latency_ms = 0.001")
    daemon = AgentDaemon(load_config(device.config))
    v1 = make_bundle(tmp_path / "v1.lfb", digits_tflite_float, release_key, version=1)
    v2 = make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2, mode="int8")
    daemon.start()
    try:
        assert daemon.install_file(v1).ok
        daemon._health = None  # v1 is the known-good baseline; watch only v2
        assert daemon.install_file(v2).ok
        assert daemon.slot.get().version == 2
        _, _, x_test, _ = digits
        for i in range(6):
            _predict(device, x_test[i])
        daemon.tick(time.time())
        assert daemon.slot.get().version == 1
        assert daemon.store.active().manifest.version == 1
        kinds = [e["kind"] for e in daemon.recent]
        assert "health_breach" in kinds and kinds[-1] == "rolled_back"
        breach = next(e for e in daemon.recent if e["kind"] == "health_breach")
        assert "p95 latency" in breach["reason"] and "max_p95_latency_ms" in breach["reason"]
        assert _predict(device, x_test[0]).shape == (10,)   # still serving, now v1
    finally:
        daemon.stop()
