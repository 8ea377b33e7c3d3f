"""The demo's fleet: real agent processes, their inference load, the fleet server, its API.

Each device is a ``litefleet-agent run`` process with its own config, trusted keys, state
directory and Unix socket, exactly as on a device (the rpi profiles are settings: threads,
quantization, budgets, so they run here as well). The server is ``litefleet server`` as a child
process. Every child starts in its own session so that ``--keep`` can leave them running and
``litefleet demo --stop`` (or the end of the demo) can stop them by the pids recorded in
``run/pids.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litefleet.demo_broker import Endpoint, free_port

FLEET = "demo"
GROUP = "demo"
TELEMETRY_S = 0.5
# (device id, profile): two of each profile
DEVICES = [("x86-1", "x86-cpu"), ("x86-2", "x86-cpu"), ("rpi4-1", "rpi4-cpu"), ("rpi4-2", "rpi4-cpu"),
           ("zero-1", "rpi-zero2w-cpu"), ("zero-2", "rpi-zero2w-cpu")]


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until truthy; :class:`TimeoutError` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)   # polling interval of a deadline loop


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        log.close()


def stop_pids(pids: list[int], timeout: float = 20.0) -> list[int]:
    """SIGTERM each pid, wait, SIGKILL what is left; returns the pids that had to be killed."""
    import psutil
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


# devices -------------------------------------------------------------------------------------

@dataclass
class Device:
    device_id: str
    profile: str
    root: Path

    config = property(lambda self: self.root / "agent.toml")
    state = property(lambda self: self.root / "state")
    trusted = property(lambda self: self.root / "trusted")
    socket = property(lambda self: self.root / "api.sock")
    log = property(lambda self: self.root / "agent.log")

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def write_device(root: Path, device_id: str, profile: str, key_dir: Path, broker: Endpoint,
                 fleet: str = FLEET) -> Device:
    """A device directory: agent.toml, trusted keys (release + operator + root public keys), state."""
    import shutil
    device = Device(device_id, profile, root)
    device.trusted.mkdir(parents=True, exist_ok=True)
    for pub in key_dir.glob("*.pub"):
        shutil.copy(pub, device.trusted / pub.name)
    tls = broker.tls_for(device_id)
    tls_lines = (f'ca_file = "{tls[0]}"\ncert_file = "{tls[1]}"\nkey_file = "{tls[2]}"\n' if tls else "")
    device.config.write_text(f'''\
# litefleet demo device {device_id} (profile {profile})
device_id = "{device_id}"
fleet = "{fleet}"
groups = ["{GROUP}"]
profile = "{profile}"
trusted_keys_dir = "{device.trusted}"
state_dir = "{device.state}"
telemetry_interval_s = {TELEMETRY_S}

[broker]
url = "{broker.url}"
{tls_lines}
[api]
unix_socket = "{device.socket}"
tcp_port = 0

[health]
# the fleet server's rollout rule judges latency here; the agent's own watch stays out of its way
window_s = 300.0
max_p95_latency_ms = 100000.0
''')
    return device


def install_locally(device: Device, bundle: Path, key_dir: Path) -> str:
    """Install ``bundle`` into the device's state before its agent starts (what provisioning does)."""
    from agent.installer import Installer
    from agent.protocol import keys, profiles
    from agent.store import ModelStore
    installer = Installer(ModelStore(device.state), keys.load_trusted_dir(device.trusted),
                          profiles.load_profile(device.profile))
    result = installer.install_file(bundle)
    if not result.ok:
        raise RuntimeError(f"{device.device_id}: installing {bundle} failed ({result.code}): {result.message}")
    if result.loaded is not None:
        result.loaded.close()
    return result.message


def start_agent(device: Device) -> subprocess.Popen:
    return spawn([sys.executable, "-m", "agent.cli", "run", "--config", str(device.config)], device.log)


def agent_serving(device: Device, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        tail = device.log.read_text(errors="replace")[-2000:] if device.log.exists() else ""
        raise RuntimeError(f"agent {device.device_id} exited with {proc.returncode}; {device.log}:\n{tail}")
    status = device.status()
    return bool(status.get("running") and status.get("pid") == proc.pid)


# local inference load ----------------------------------------------------------------------

class Load:
    """Steady local inference requests on every device (what an application on it would send),
    so that the fleet's telemetry has real latencies for the rollout's health rule."""

    def __init__(self, devices: list[Device], sample: list, period_s: float = 0.05) -> None:
        self.body = json.dumps({"instances": [sample]}).encode()
        self.period_s = period_s
        self.stop_event = threading.Event()
        self.requests = 0
        self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(d,), daemon=True, name=f"load-{d.device_id}")
                        for d in devices]
        for thread in self.threads:
            thread.start()

    def _run(self, device: Device) -> None:
        from agent.commands.predict import ApiClient
        client = ApiClient(unix_socket=str(device.socket))
        while not self.stop_event.wait(self.period_s):   # the pacing of a load generator
            try:
                status, _, _ = client.request("POST", "/v1/models/digits:predict", self.body,
                                              {"Content-Type": "application/json"})
                if status == 200:
                    self.requests += 1
                else:
                    self.errors += 1
            except Exception:  # noqa: BLE001 - a model swap under load; the agent counts real errors
                self.errors += 1

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(5)


# the fleet server --------------------------------------------------------------------------

class Server:
    """``litefleet server`` as a child process, and a small client of its HTTP API."""

    def __init__(self, data_dir: Path, key_dir: Path, broker: Endpoint, fleet: str = FLEET) -> None:
        self.data_dir = data_dir
        self.fleet = fleet
        self.key_dir = key_dir
        self.broker = broker
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def repo(self) -> Path:
        return self.data_dir / "repo"

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "litefleet.cli", "server", "--broker", self.broker.url, "--fleet", self.fleet,
                "--data", str(self.data_dir), "--trust", str(self.key_dir / "release.pub"),
                "--operator-key", str(self.key_dir / "operator.key"), "--http-port", str(self.port),
                "--share-group", "", "--stats-interval", "3600"]
        tls = self.broker.tls_for("litefleet-server")
        if tls:
            argv += ["--ca", tls[0], "--cert", tls[1], "--key", tls[2]]
        if self.broker.kind == "amqtt":             # speaks MQTT 3.1.1 only
            argv += ["--ingest-protocol", "3.1.1"]
        return argv

    def start(self, timeout: float = 60.0) -> "Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = spawn(self.argv(), self.log)
        token_file = self.data_dir / "api-token"

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litefleet server exited with {self.proc.returncode}; {self.log}:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if not token_file.exists():
                return False
            self.token = token_file.read_text().strip()
            try:
                self.get("/api/v1/devices")
                return True
            except (OSError, urllib.error.URLError):
                return False
        wait_until(up, timeout, "the fleet server's API")
        return self

    def request(self, method: str, path: str, doc: Any = None, timeout: float = 10.0) -> Any:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError):
                message = exc.reason
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {message}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def devices(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/devices").get("devices", [])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.get(f"/api/v1/rollouts/{rollout_id}")["rollout"]

    def start_rollout(self, bundles: list[Path], **spec: Any) -> dict[str, Any]:
        """What ``litefleet rollout start`` does: verify, add to the repository, create via the API."""
        from fleet.cli_rollout import bundles_for
        doc = {"bundles": bundles_for(bundles, self.repo, [self.key_dir / "release.pub"]), **spec}
        return self.request("POST", "/api/v1/rollouts", doc)["rollout"]

    def dashboard_url(self) -> str:
        from fleet.api import dashboard_url
        return dashboard_url(self.url, self.token)


__all__ = ["DEVICES", "FLEET", "GROUP", "Device", "Load", "Server", "write_device", "install_locally",
           "start_agent", "agent_serving", "stop_pids", "spawn", "wait_until"]
