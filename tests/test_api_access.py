"""Who may ask the model: a real agent process with its TCP listener on (bearer tokens) and its Unix
socket given to a group; real clients, including processes run as another user (tests run as root
here, so the probes drop to nobody with and without the socket's group)."""

from __future__ import annotations

import errno
import grp
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from agent.access import AccessControl, TokenSet
from agent.api import InferenceServer
from agent.config import parse_config
from agent.errors import ConfigError
from agent.model_slot import ModelSlot
from agent.spool import Spool
from tests.conftest import run_cli
from tests.support.agents import AgentProcess, make_device, wait_for
from tests.support.bundles import make_bundle

APP_TOKEN = "app-token-Zk3q9Vd0aQw8PzLm2Rb7"
FACES_TOKEN = "faces-token-Hn4Jx6Tg1Ys5Cu0Ke9"
SOCKET_GROUP = "users"           # an existing group the agent gives its socket to
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a probe as another user needs root")

PROBE = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": str(exc)}))
    raise SystemExit(0)
s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(json.dumps({"status": int(data.split()[1]), "body": data.split(b"\r\n\r\n", 1)[1].decode()}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys_dir, release_key, digits_tflite_int8):
    """A real agent serving digits v1: TCP on (two tokens, one limited to 'faces'), socket group 'users'."""
    root = tmp_path_factory.mktemp("access")
    port = free_port()
    device = make_device(root / "dev", keys_dir, tcp_port=port, telemetry_interval_s=0.3)
    tokens = root / "dev" / "api-tokens"
    tokens.write_text(f"# test tokens\napp {APP_TOKEN} *\nfaces-only {FACES_TOKEN} faces\n")
    tokens.chmod(0o600)
    # the socket's directory must be enterable by everyone for the group to be what decides
    sock_dir = Path(tempfile.mkdtemp(prefix="lf-api-", dir="/tmp"))
    sock_dir.chmod(0o755)
    sock = sock_dir / "api.sock"
    text = device.config.read_text().replace(
        f'unix_socket = "{device.socket}"',
        f'unix_socket = "{sock}"\nsocket_group = "{SOCKET_GROUP}"\ntokens_file = "{tokens}"')
    device.config.write_text(text)
    device.socket = sock
    bundle = make_bundle(root / "v1.lfb", digits_tflite_int8, release_key, version=1, mode="int8")
    installed = run_cli("agent", "install-bundle", str(bundle), "--config", str(device.config))
    assert installed.returncode == 0, installed.stderr
    proc = AgentProcess(device)
    try:
        proc.wait_serving(90)
        yield {"device": device, "proc": proc, "port": port, "tokens": tokens, "socket": sock}
    finally:
        assert proc.stop() == 0, proc.log()
        shutil.rmtree(sock_dir, ignore_errors=True)


def request(port: int, method: str, path: str, body: bytes | None = None,
            authorization: str | None = None) -> tuple[int, dict[str, str], dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


def refusals(device) -> tuple[int, int]:
    """Refused requests summed over the telemetry the agent spooled for the fleet."""
    with Spool(device.state / "spool.sqlite") as spool:
        rows = spool.peek(100_000)
    docs = [doc for _, kind, doc in rows if kind == "telemetry"]
    return (sum(d.get("api", {}).get("unauthorized", 0) for d in docs),
            sum(d.get("api", {}).get("forbidden", 0) for d in docs))


def test_tcp_needs_a_valid_token_for_the_model_and_refusals_reach_telemetry(agent, digits):
    port, device = agent["port"], agent["device"]
    before = refusals(device)
    image = digits[2][0]
    body = json.dumps({"instances": [image.tolist()]}).encode()

    status, headers, doc = request(port, "POST", "/v1/models/digits:predict", body)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="litefleet-agent"'
    assert "Authorization: Bearer <token>" in doc["error"] and "Unix socket" in doc["error"]

    status, headers, doc = request(port, "POST", "/v1/models/digits:predict", body, "Bearer not-a-valid-token-at-all")
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert "not valid for this agent" in doc["error"]

    status, _, doc = request(port, "GET", "/v1/models/digits", authorization="Basic YXBwOnNlY3JldA==")
    assert status == 401 and "'Basic'" in doc["error"]

    status, headers, doc = request(port, "POST", "/v1/models/digits:predict", body, f"Bearer {FACES_TOKEN}")
    assert status == 403 and 'error="insufficient_scope"' in headers["www-authenticate"]
    assert doc["error"] == "token 'faces-only' may not use model 'digits'; it is limited to faces"
    # the limited token does not even see the model in the list
    assert request(port, "GET", "/v1/models", authorization=f"Bearer {FACES_TOKEN}")[2] == {"models": []}

    status, _, doc = request(port, "POST", "/v1/models/digits:predict", body, f"Bearer {APP_TOKEN}")
    assert status == 200 and np.asarray(doc["predictions"]).shape == (1, 10)

    # three 401s and one 403, reported in the telemetry the fleet receives
    expected = (before[0] + 3, before[1] + 1)
    wait_for(lambda: refusals(device) == expected, 20, f"telemetry to count {expected} refusals")
    status_doc = device.status()
    assert status_doc["api"]["refused"] == {"unauthorized": expected[0], "forbidden": expected[1]}
    # one log line for the burst, not one per attempt
    assert agent["proc"].log().count("inference API refused a TCP request") == 1


@needs_root
def test_only_members_of_the_sockets_group_may_connect(agent):
    sock = agent["socket"]
    info = sock.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam(SOCKET_GROUP).gr_gid

    def probe(**ids) -> dict:
        result = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, str(sock)], capture_output=True, text=True,
                                timeout=30, user=NOBODY, group=NOBODY, **ids)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    outsider = probe(extra_groups=[])
    assert outsider["errno"] == errno.EACCES, outsider
    member = probe(extra_groups=[SOCKET_GROUP])
    assert member["status"] == 200                       # no token on the socket: the group is the key
    assert json.loads(member["body"])["models"][0]["name"] == "digits"


def test_predict_cli_sends_the_token_from_a_file_or_the_agents_config(agent, digits, tmp_path):
    url = f"http://127.0.0.1:{agent['port']}"
    image = json.dumps(digits[2][0].tolist())
    own = tmp_path / "app.token"
    own.write_text(APP_TOKEN + "\n")
    result = run_cli("agent", "predict", "--url", url, "--token-file", str(own), "--data", image)
    assert result.returncode == 0, result.stderr
    assert "top 5 of 10 classes" in result.stdout
    # on the device, the agent's own config names the tokens file
    result = run_cli("agent", "predict", "--url", url, "--config", str(agent["device"].config), "--data", image)
    assert result.returncode == 0, result.stderr
    # and without --url or --socket, the configured socket is used
    result = run_cli("agent", "predict", "--config", str(agent["device"].config), "--model", "digits",
                     "--data", image, "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["prediction_id"]) == 32
    # a limited token is refused with the server's reason
    limited = tmp_path / "faces.token"
    limited.write_text(FACES_TOKEN)
    result = run_cli("agent", "predict", "--url", url, "--token-file", str(limited), "--model", "digits",
                     "--data", image)
    assert result.returncode == 2 and "HTTP 403" in result.stderr and "may not use model 'digits'" in result.stderr
    result = run_cli("agent", "predict", "--url", url, "--config", str(tmp_path / "none.toml"), "--model", "digits",
                     "--data", image)
    assert result.returncode == 2 and "HTTP 401" in result.stderr and "bearer token" in result.stderr


def test_tcp_is_off_by_default_and_never_served_without_tokens(tmp_path, keys_dir):
    config = parse_config('device_id = "d"\nprofile = "x86-cpu"\n', "<default>")
    assert config.api.tcp_port == 0 and config.api.socket_group == ""
    with pytest.raises(ConfigError, match="needs bearer tokens"):
        InferenceServer(ModelSlot(), tcp=("127.0.0.1", 0), unix_socket=None)
    with pytest.raises(ConfigError, match="needs bearer tokens"):
        InferenceServer(ModelSlot(), tcp=("127.0.0.1", 0), tokens=TokenSet.parse("# none yet\n", "<empty>"))

    # an agent configured for TCP without a usable tokens file stops with EX_CONFIG, naming the file
    device = make_device(tmp_path / "dev", keys_dir, tcp_port=free_port())
    text = device.config.read_text().replace('tcp_host = "127.0.0.1"',
                                              f'tcp_host = "127.0.0.1"\ntokens_file = "{tmp_path / "missing"}"')
    device.config.write_text(text)
    result = run_cli("agent", "run", "--config", str(device.config))
    assert result.returncode == 78
    assert f"{tmp_path / 'missing'}: tokens file not found" in result.stderr
    open_file = tmp_path / "open-tokens"
    open_file.write_text(f"app {APP_TOKEN}\n")
    open_file.chmod(0o644)
    device.config.write_text(text.replace(str(tmp_path / "missing"), str(open_file)))
    result = run_cli("agent", "run", "--config", str(device.config))
    assert result.returncode == 78 and "chmod 600" in result.stderr

    # a socket group that does not exist is a configuration error too
    other = make_device(tmp_path / "dev2", keys_dir)
    other.config.write_text(other.config.read_text().replace(
        'tcp_host = "127.0.0.1"', 'tcp_host = "127.0.0.1"\nsocket_group = "no-such-group-lf"'))
    result = run_cli("agent", "run", "--config", str(other.config))
    assert result.returncode == 78
    assert "api.socket_group: there is no group 'no-such-group-lf'" in result.stderr
    assert not other.socket.exists()


@pytest.mark.parametrize("text, words", [
    ("app short\n", "at least 16"),
    (f"app {APP_TOKEN}\napp {FACES_TOKEN}\n", "used twice"),
    (f"app {APP_TOKEN}\nother {APP_TOKEN}\n", "same as an earlier one"),
    (f"a/b {APP_TOKEN}\n", "token name"),
    (f"app {APP_TOKEN} digits extra\n", "expected 'NAME TOKEN [MODELS]'"),
    (f"app {APP_TOKEN} ,\n", "comma-separated model names"),
])
def test_a_bad_tokens_file_names_the_line_and_never_the_token(text, words):
    with pytest.raises(ConfigError) as caught:
        TokenSet.parse("# header\n" + text, "/etc/litefleet/api-tokens")
    message = str(caught.value)
    assert words in message and message.startswith("/etc/litefleet/api-tokens:")
    assert APP_TOKEN not in message and FACES_TOKEN not in message


def test_refusals_are_logged_at_most_once_per_interval(caplog):
    now = [1000.0]
    access = AccessControl(TokenSet.parse(f"app {APP_TOKEN}\n", "<t>"), log_every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="agent.access"):
        for _ in range(50):
            assert access.check("tcp", "Bearer wrong-token-0123456789", "digits")[1].status == 401
        now[0] += 61
        assert access.check("tcp", "", "digits")[1].status == 401
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "wrong token" in lines[0] and "49 more refused in the last 60 s" in lines[1]
    assert access.snapshot_and_reset() == {"unauthorized": 51, "forbidden": 0}
    assert access.snapshot_and_reset() == {"unauthorized": 0, "forbidden": 0}
    assert access.totals()["unauthorized"] == 51
    # the socket never asks for a token
    assert access.check("unix", "", "digits") == (None, None)
