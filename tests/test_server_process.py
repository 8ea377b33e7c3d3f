"""``litefleet server`` as a real process: repository, ingest, API and metrics composed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.mqtt import MqttLink
from agent.protocol import messages
from agent.protocol.topics import Topics
from tests.conftest import ROOT, run_cli
from tests.support.agents import wait_for
from tests.support.broker import Mosquitto, plain_config

FLEET = "srv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    with Mosquitto(plain_config, tmp_path / "broker") as b:
        yield b


def _birth(device: str) -> bytes:
    return messages.encode({"v": 1, "state": "online", "device_id": device, "ts": time.time(), "fleet": FLEET,
                            "groups": ["line-a"], "profile": "x86-cpu", "agent_version": "0.1.0",
                            "runtime": {"name": "ai-edge-litert", "version": "2.3.0"},
                            "engine": {"delegate": "xnnpack"},
                            "active_model": {"name": "digits", "version": 3, "sha256": "a" * 64}})


def _telemetry(device: str, seq: int) -> bytes:
    data = {"schema": 1, "type": "telemetry", "time": time.time(), "agent": {"version": "0.1.0", "uptime_s": 5.0},
            "model": {"name": "digits", "version": 3, "sha256": "a" * 64},
            "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": "xnnpack"},
            "inference": {"count": 50, "errors": 0, "interval_s": 1.0, "inferences_per_s": 50.0, "sampled": 50,
                          "latency_ms": {"p50": 1.0, "p95": 2.5, "p99": 3.0, "mean": 1.2, "max": 4.0}},
            "system": {"cpu_percent": 12.0, "temperature_c": 48.0}}
    return messages.encode({"v": 1, "device_id": device, "seq": seq, "ts": time.time(), "data": data})


def test_server_ingests_serves_the_api_and_stops_cleanly(tmp_path, broker, keys_dir):
    port = _free_port()
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "litefleet.cli", "server", "--broker", broker.url, "--fleet", FLEET,
         "--data", str(data), "--trust", str(keys_dir / "release.pub"), "--http-port", str(port),
         "--stats-interval", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    device = MqttLink(broker.url, "dev-7", clean_start=True)
    device.start()
    try:
        token_file = data / "api-token"
        wait_for(lambda: token_file.exists() and _up(port), 60, "the server's API")
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert device.wait_connected(10)
        # The API answers before the ingest link has subscribed; telemetry sent earlier would have no reader.
        wait_for(lambda: _ingest_subscribed(port, token_file.read_text().strip()), 60, "ingest to subscribe")
        topics = Topics(FLEET)
        device.publish(str(topics.status("dev-7")), _birth("dev-7"), retain=True).wait(10)
        for seq in (1, 2, 3, 5):      # 4 never arrives: one message lost
            device.publish(str(topics.telemetry("dev-7")), _telemetry("dev-7", seq)).wait(10)

        def ingested():
            result = run_cli("fleet", "status", "--server", f"http://127.0.0.1:{port}",
                             "--token-file", str(token_file), "--json")
            if result.returncode != 0:
                return None
            devices = json.loads(result.stdout)["devices"]
            return devices if devices and devices[0].get("p95_ms") is not None and devices[0].get("lost") else None
        devices = wait_for(ingested, 60, "the device in `litefleet fleet status`")
        assert devices[0]["device_id"] == "dev-7" and devices[0]["online"]
        assert devices[0]["lost"] == 1 and devices[0]["p95_ms"] == 2.5

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'litefleet_devices{state="online"} 1.0' in metrics
        table = run_cli("fleet", "status", "--server", f"http://127.0.0.1:{port}", "--token-file", str(token_file))
        assert "dev-7" in table.stdout and "digits" in table.stdout
    finally:
        device.stop()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert code == 0, text
    assert "stopped;" in text and "ingest" in text


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/openapi.json", timeout=2).read()
        return True
    except OSError:
        return False


def _ingest_subscribed(port: int, token: str) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/ingest",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return bool(json.loads(response.read())["subscribed"])
