"""``litefleet demo`` as a user runs it: a real process, on a fresh folder, with each broker kind.

Each run trains (the default 15 epochs: a 3-epoch model can fail the int8 runtimes check), converts
for three profiles, starts its broker (mosquitto with the generated TLS/ACL configuration, or amqtt in a child process),
six agent processes and the fleet server, rolls out v2 to all six, has the slow v3 stopped at
stage 1 and rolled back, predicts through a device's socket, and stops everything. The tests
check the output a user reads, the devices' own state files, and that no process of the demo
is left on the machine afterwards: the amqtt run stops everything itself; the mosquitto run uses
``--keep``, checks the fleet is still up and serving v2, then ``litefleet demo --stop`` takes it down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["x86-1", "x86-2", "rpi4-1", "rpi4-2", "zero-1", "zero-2"]
LIMIT_S = 180.0


def run_demo(out: Path, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "litefleet.cli", "demo", "-o", str(out), *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"})
    return result, time.monotonic() - started


def demo_processes(out: Path) -> list[str]:
    """Processes on this machine whose command line names the demo's folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
        except psutil.Error:
            continue
        if str(out) in cmd:
            found.append(f"{proc.info['pid']}: {cmd[:200]}")
    return found


def device_versions(out: Path) -> dict[str, int | None]:
    """The active model version in each stopped device's store (from its status file)."""
    versions = {}
    for device in DEVICES:
        status = json.loads((out / "run" / "devices" / device / "state" / "status.json").read_text())
        assert status["running"] is False, f"{device} did not stop cleanly"
        versions[device] = ((status.get("store") or {}).get("active") or {}).get("version")
    return versions


def check_flow(text: str) -> None:
    """What the user must see: v2 everywhere, v3 stopped and rolled back, predictions, the dashboard."""
    assert "digits-v2: completed stage 3/3: completed: 6 device(s) updated" in text, text[-4000:]
    assert "completed: 6 of 6 devices on v2" in text
    assert "digits-v3-slow: aborted stage 1/3" in text
    assert re.search(r"health rule p95_latency_ms<=5\*baseline,error_rate<1% violated: p95_latency_ms [\d.]+", text)
    assert "1 device(s) rolled back" in text
    assert re.search(r"rolled back: \S+ -> v2; the other 5 device\(s\) never received v3", text)
    predicted = re.search(r"predicted  ([\d ]+?)\s+\((\d+)/(\d+) right\)", text)
    assert predicted, text[-3000:]
    assert int(predicted.group(2)) >= int(predicted.group(3)) - 2       # a trained model, real digits
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/#token=[A-Za-z0-9_%-]{20,}", text)
    assert re.search(r"demo finished in \d+ s", text)


def test_demo_with_amqtt_runs_the_whole_fleet_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "demo-amqtt"
    result, elapsed = run_demo(out, "--broker-kind", "amqtt")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-6000:]
    check_flow(text)
    assert elapsed < LIMIT_S, f"the demo took {elapsed:.0f} s"
    assert re.search(r"broker:\s+mqtt://127\.0\.0\.1:\d+ \(amqtt\)", text)
    assert "MQTT 3.1.1 only, plain TCP, no TLS, no ACL" in text
    assert "stopped; nothing left running" in text
    assert demo_processes(out) == []
    assert device_versions(out) == {d: 2 for d in DEVICES}


def test_demo_with_mosquitto_and_keep_stays_up_until_stop(tmp_path):
    out = tmp_path / "demo-mosquitto"
    result, elapsed = run_demo(out, "--broker-kind", "mosquitto", "--keep")
    text = result.stdout + result.stderr
    try:
        assert result.returncode == 0, text[-6000:]
        check_flow(text)
        assert elapsed < LIMIT_S, f"the demo took {elapsed:.0f} s"
        assert re.search(r"broker:\s+mqtts://localhost:\d+ \(mosquitto\)", text)
        conf = (out / "run" / "broker" / "mosquitto.conf").read_text()
        assert "require_certificate true" in conf and "use_identity_as_username true" in conf
        assert (out / "run" / "broker" / "clients" / "zero-2.crt").exists()
        assert f"litefleet demo --stop -o {out}" in text
        running = demo_processes(out)
        assert len(running) == 8, running          # six agents, the server, mosquitto
        token = (out / "run" / "server" / "api-token").read_text().strip()
        url = re.search(r"fleet table: litefleet fleet status --server (\S+)", text).group(1)
        request = urllib.request.Request(f"{url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            devices = json.loads(response.read())["devices"]
        assert {(d["device_id"], d["model"]["version"]) for d in devices} == {(d, 2) for d in DEVICES}
    finally:
        stopped = subprocess.run([sys.executable, "-m", "litefleet.cli", "demo", "-o", str(out), "--stop"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=120,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "everything stopped" in stopped.stdout
    assert demo_processes(out) == []
    assert device_versions(out) == {d: 2 for d in DEVICES}
