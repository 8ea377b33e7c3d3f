"""Shared pieces of the rollout tests: a fleet of real agents on v1, and `litefleet server` as a process.

``start_agents`` writes one device directory per id, installs the first bundle locally (what a
factory image would hold) and starts ``litefleet-agent run`` for each as a real process.
``ServerProcess`` runs ``litefleet server`` as a child process with the operator key (so its
rollout runner drives rollouts), can be SIGKILLed like a crash and started again on the same data
directory, port and database, and talks to its HTTP API with the token it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.agents import ROOT, AgentProcess, make_device, wait_for
from tests.support.broker import free_port


def start_agents(root: Path, keys_dir: Path, broker_url: str, bundle: Path, device_ids: list[str], *,
                 fleet: str, groups: tuple[str, ...], profile: str = "x86-cpu", telemetry_interval_s: float = 0.5,
                 health: str = "window_s = 300.0\nmax_p95_latency_ms = 100000.0",
                 timeout: float = 60.0) -> list[AgentProcess]:
    """Agents running ``bundle`` (installed locally first), serving, connected to ``broker_url``.

    The default ``health`` keeps the agent's own latency watch out of the way, so that what stops a
    slow model in a rollout test is the server's health rule (the agent-side watch has its own tests).
    """
    from agent.installer import Installer
    from agent.protocol import keys, profiles
    from agent.store import ModelStore
    trusted = keys.load_trusted_dir(keys_dir)
    agents: list[AgentProcess] = []
    try:
        for device_id in device_ids:
            d = make_device(root / device_id, keys_dir, device_id=device_id, fleet=fleet, groups=groups,
                            profile=profile, telemetry_interval_s=telemetry_interval_s,
                            broker=f'url = "{broker_url}"\n', health=health)
            result = Installer(ModelStore(d.state), trusted, profiles.load_profile(profile)).install_file(bundle)
            assert result.ok, result.message
            result.loaded.close()
            agents.append(AgentProcess(d))
        for agent in agents:
            agent.wait_serving(timeout)
    except BaseException:
        for agent in agents:
            agent.stop()
        raise
    return agents


def active_version(agent: AgentProcess) -> int | None:
    """The model version the agent reports active in its status file."""
    return (agent.device.status().get("model") or {}).get("version")


class ServerProcess:
    """``litefleet server`` with ``--operator-key`` as a child process; ``kill`` is a crash, ``start`` again resumes."""

    def __init__(self, data_dir: Path, keys_dir: Path, broker_url: str, fleet: str, *,
                 db: str | None = None, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.keys_dir = keys_dir
        self.broker_url = broker_url
        self.fleet = fleet
        self.db = db
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def repo(self) -> Path:
        return self.data_dir / "repo"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "api-token"

    def log_path(self, run: int | None = None) -> Path:
        """The log of the ``run``-th start (1-based; default: the latest)."""
        return self.data_dir / f"server-{run or self.starts}.log"

    def log(self, run: int | None = None) -> str:
        try:
            return self.log_path(run).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        """Start (again) on the same port, data directory and database; return once the API answers."""
        assert self.proc is None or self.proc.poll() is not None, "the server is still running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = [sys.executable, "-m", "litefleet.cli", "server", "--broker", self.broker_url, "--fleet", self.fleet,
                "--data", str(self.data_dir), "--trust", str(self.keys_dir / "release.pub"),
                "--operator-key", str(self.keys_dir / "operator.key"), "--http-port", str(self.port),
                "--share-group", "", "--stats-interval", "3600"] + (["--db", self.db] if self.db else [])
        self._log = open(self.log_path(), "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"litefleet server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if not self.token_file.exists():
                return False
            try:
                self.get("/api/v1/ingest")
                return True
            except OSError:
                return False
        wait_for(up, timeout, f"litefleet server (start {self.starts}) to answer on {self.url}", interval=0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: the server dies mid-work, nothing is flushed or said goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the exit status (0 on a clean stop)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self._reap()

    def _reap(self) -> int | None:
        code = None
        if self.proc is not None:
            code = self.proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def request(self, method: str, path: str, doc: Any = None, timeout: float = 10.0) -> Any:
        data = json.dumps(doc).encode() if doc is not None else None
        token = self.token_file.read_text().strip()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.get(f"/api/v1/rollouts/{rollout_id}")["rollout"]


__all__ = ["start_agents", "active_version", "ServerProcess"]
