"""Real agent processes for tests: a device directory with config, trusted keys and state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Device:
    """A device's files: ``config`` (agent.toml), ``state`` (state dir), ``trusted`` (keys)."""

    root: Path
    device_id: str
    config: Path
    state: Path
    trusted: Path
    socket: Path

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def make_device(root: Path, keys_dir: Path, *, device_id: str = "dev-1", profile: str = "x86-cpu",
                tcp_port: int = 0, extra: str = "", telemetry_interval_s: float = 1.0,
                health: str = "", broker: str = "", fleet: str = "test", groups: tuple[str, ...] = ()) -> Device:
    """Write a device directory whose agent trusts the keys in ``keys_dir``."""
    root.mkdir(parents=True, exist_ok=True)
    trusted = root / "trusted"
    trusted.mkdir(exist_ok=True)
    for pub in keys_dir.glob("*.pub"):
        shutil.copy(pub, trusted / pub.name)
    state = root / "state"
    sock = root / "api.sock"
    config = root / "agent.toml"
    config.write_text(f'''\
device_id = "{device_id}"
fleet = "{fleet}"
groups = {json.dumps(list(groups))}
profile = "{profile}"
trusted_keys_dir = "{trusted}"
state_dir = "{state}"
telemetry_interval_s = {telemetry_interval_s}
{extra}
[broker]
{broker}
[api]
unix_socket = "{sock}"
tcp_host = "127.0.0.1"
tcp_port = {tcp_port}
workers = 2

[health]
{health or 'window_s = 300.0'}
''')
    return Device(root, device_id, config, state, trusted, sock)


class AgentProcess:
    """``litefleet-agent run`` as a real child process."""

    def __init__(self, device: Device, env: dict[str, str] | None = None) -> None:
        self.device = device
        self.log_path = device.root / "agent.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(device.config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 60) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            status = self.device.status()
            return status if status.get("running") and status.get("pid") == self.proc.pid else None
        return wait_for(ready, timeout, f"agent {self.device.device_id} to start")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()
