"""``litefleet fleet status|device``: the real CLI process against a real API server over a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.api import ApiServer, ServerApi, ensure_token
from fleet.cli_fleet import ago, sparkline
from tests.support.agents import wait_for
from tests.test_server_api import fill_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    from fleet.store import open_store
    store = open_store(str(tmp_path / "fleet.db"))
    store.migrate()
    now = time.time()
    fill_store(store, now)
    store.record_alert({"device_id": "dev-b", "kind": "temperature", "open": True, "ts": now,
                        "message": "dev-b is at 95.5 °C, over its profile's limit of 90 °C"})
    data = tmp_path / "data"
    token = ensure_token(data)
    api = ServerApi(store, token, web_dir=tmp_path)
    with ApiServer(api, port=0) as srv:
        srv.token_file = data / "api-token"
        yield srv
    store.close()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("LITEFLEET_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "litefleet.cli", "fleet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_status_table_shows_every_device(server):
    r = cli("status", "--server", server.url, "--token-file", str(server.token_file))
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("dev-")}
    assert set(lines) == {"dev-a", "dev-b", "dev-c"}
    assert " online " in lines["dev-a"] and " offline " in lines["dev-c"]
    assert "digits v3" in lines["dev-b"] and "gpu" in lines["dev-b"] and "95.5" in lines["dev-b"]
    assert "v4 accepted" in lines["dev-b"]                     # the deployment in progress
    assert "temperature" in lines["dev-b"]                     # its active alert
    assert "23 min ago" in lines["dev-c"] and " s ago" in lines["dev-a"]   # its last telemetry
    assert lines["dev-c"].split()[-2] == "2"                   # messages lost
    assert "2 online / 1 offline of 3 device(s)" in r.stdout and "alerts: 1 (temperature 1)" in r.stdout


def test_status_filters_and_json(server):
    r = cli("status", "--server", server.url, "--token-file", str(server.token_file), "--json", "--group", "lab")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(d["device_id"] for d in doc["devices"]) == ["dev-a", "dev-c"]
    assert doc["summary"]["total"] == 2
    r = cli("status", "--server", server.url, "--token-file", str(server.token_file), "--profile", "jetson-gpu")
    assert r.returncode == 0 and "dev-b" in r.stdout and "dev-a" not in r.stdout


def test_watch_refreshes_until_interrupted(server):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "litefleet.cli", "fleet", "status", "--server", server.url,
                             "--token-file", str(server.token_file), "--watch", "--interval", "0.2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum("online / 1 offline" in line for line in out) >= 2, 30, "two refreshes of the table")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        reader.join(timeout=5)
    assert proc.returncode == 0, proc.stderr.read()
    stamps = [line.rsplit("updated ", 1)[1] for line in out if "updated " in line]
    assert len(stamps) >= 2 and sum(line.startswith("dev-a ") for line in out) >= 2


def test_watch_redraws_in_place_on_a_terminal(server):
    """On a (pseudo-)terminal --watch uses rich Live: each refresh moves the cursor up and redraws."""
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "litefleet.cli", "fleet", "status", "--server", server.url,
                             "--token-file", str(server.token_file), "--watch", "--interval", "0.2"],
                            cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen = bytearray()

    def read_some() -> bool:
        import select
        if select.select([master], [], [], 0.2)[0]:
            try:
                screen.extend(os.read(master, 65536))
            except OSError:
                return False
        return screen.count(b"updated ") >= 3
    try:
        wait_for(read_some, 30, "three redraws on the terminal")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        os.close(master)
    assert proc.returncode == 0
    assert b"\x1b[1A" in screen and b"\x1b[2K" in screen        # cursor up + erase line: redrawn in place
    assert b"dev-b" in screen


def test_device_history(server):
    r = cli("device", "dev-a", "--server", server.url, "--token-file", str(server.token_file))
    assert r.returncode == 0, r.stderr
    assert "dev-a" in r.stdout and "online" in r.stdout and "digits v2" in r.stdout
    assert "20 sample(s)" in r.stdout
    p95_line = next(line for line in r.stdout.splitlines() if line.startswith("p95 ms"))
    assert any(ch in p95_line for ch in "▁▂▃▄▅▆▇█")
    assert "installed" in r.stdout and "cmd-1" in r.stdout
    hot = cli("device", "dev-b", "--server", server.url, "--token-file", str(server.token_file))
    assert "temperature" in hot.stdout and "active" in hot.stdout and "95.5" in hot.stdout
    doc = json.loads(cli("device", "dev-c", "--json", "--server", server.url,
                         "--token-file", str(server.token_file)).stdout)
    assert doc["device"]["online"] is False and len(doc["telemetry"]) == 5


@pytest.mark.parametrize("case", ["bad token", "missing token file", "unknown device", "no server"])
def test_errors_are_one_line_and_non_zero(server, tmp_path, case):
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    if case == "bad token":
        r = cli("status", "--server", server.url, "--token-file", str(bad))
        expect = "refused the token"
    elif case == "missing token file":
        r = cli("status", "--server", server.url, "--token-file", str(tmp_path / "nope"))
        expect = "not found"
    elif case == "unknown device":
        r = cli("device", "ghost", "--server", server.url, "--token-file", str(server.token_file))
        expect = "unknown device 'ghost'"
    else:
        import socket
        with socket.socket() as s:                  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = cli("status", "--server", f"http://127.0.0.1:{port}", "--token-file", str(server.token_file))
        expect = "cannot reach the fleet server"
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litefleet: error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_time_and_sparkline_formatting():
    assert ago(100.0, 103.2) == "3 s ago" and ago(0, 600) == "10 min ago" and ago(None, 1) == "never"
    assert ago(0, 7200) == "2 h ago" and ago(0, 3 * 86400) == "3 d ago"
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, None, 5]) == "▁▁ ▁" and sparkline([]) == ""
