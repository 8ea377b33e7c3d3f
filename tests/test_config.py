"""The agent's config file: a valid one loads, every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (EX_CONFIG, AgentConfig, default_config_text, load_config, parse_config)
from agent.errors import ConfigError
from tests.conftest import run_cli

MINIMAL = 'device_id = "gw-0001"\nprofile = "x86-cpu"\n'


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_config_loads_with_every_value(tmp_path):
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "dev.crt").write_text("crt")
    (tmp_path / "dev.key").write_text("key")
    path = write(tmp_path, '''
device_id = "gw-0001"
fleet = "plant3"
groups = ["line-a", "canary"]
profile = "x86-cpu"
trusted_keys_dir = "trusted"
state_dir = "/var/lib/lf-test"
telemetry_interval_s = 10
spool_max_rows = 500
[labels]
site = "plant-3"
[broker]
url = "mqtts://broker.example:8883"
ca_file = "ca.pem"
cert_file = "dev.crt"
key_file = "dev.key"
keepalive_s = 15
[api]
tcp_port = 0
workers = 3
[health]
window_s = 60
min_requests = 5
max_error_rate = 0.1
max_p95_latency_ms = 40
''')
    cfg = load_config(path)
    assert isinstance(cfg, AgentConfig)
    assert cfg.path == str(path)
    assert (cfg.device_id, cfg.fleet, cfg.groups, cfg.labels) == ("gw-0001", "plant3", ("line-a", "canary"),
                                                                   {"site": "plant-3"})
    assert cfg.profile == "x86-cpu" and cfg.load_profile().name == "x86-cpu"
    assert cfg.trusted_keys_dir == tmp_path / "trusted"          # relative to the config file
    assert cfg.state_dir == Path("/var/lib/lf-test")
    assert cfg.telemetry_interval_s == 10.0 and cfg.spool_max_rows == 500
    assert cfg.broker.url == "mqtts://broker.example:8883" and cfg.broker.keepalive_s == 15
    assert cfg.broker.ca_file == str(tmp_path / "ca.pem")
    assert cfg.api.tcp_port == 0 and cfg.api.workers == 3
    assert cfg.api.unix_socket == "/var/lib/lf-test/api.sock"    # default under the state dir
    assert (cfg.health.window_s, cfg.health.min_requests, cfg.health.max_error_rate,
            cfg.health.max_p95_latency_ms) == (60.0, 5, 0.1, 40.0)


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.fleet == "default" and cfg.groups == () and cfg.labels == {}
    assert cfg.api.tcp_host == "127.0.0.1" and cfg.api.tcp_port == 0      # TCP off unless configured
    assert cfg.broker.url == ""
    assert cfg.health.window_s == 300.0 and cfg.health.max_p95_latency_ms == 0.0


def test_default_config_text_parses_and_is_commented(tmp_path):
    text = default_config_text(device_id="edge-7")
    assert text.count("#") > 10
    cfg = load_config(write(tmp_path, text))
    assert cfg.device_id == "edge-7" and cfg.profile == "x86-cpu"
    # Without a device id the host name is used, made safe for topics.
    assert load_config(write(tmp_path, default_config_text(), "b.toml")).device_id


@pytest.mark.parametrize("text, key, words", [
    ('profile = "x86-cpu"\n', "device_id", "required"),
    ('device_id = "a/b"\nprofile = "x86-cpu"\n', "device_id", "MQTT topics"),
    ('device_id = "dev+1"\nprofile = "x86-cpu"\n', "device_id", "MQTT topics"),
    ('device_id = 7\nprofile = "x86-cpu"\n', "device_id", "expected a string"),
    (MINIMAL + 'groups = ["ok", "not ok"]\n', "groups", "MQTT topics"),
    (MINIMAL + 'telemetry_interval_s = 0\n', "telemetry_interval_s", "greater than 0"),
    (MINIMAL + '[broker]\nurl = "http://broker:1883"\n', "broker.url", "mqtts://"),
    (MINIMAL + '[broker]\nca_file = "missing-ca.pem"\n', "broker.ca_file", "not found"),
    (MINIMAL + '[api]\ntcp_port = 70000\n', "api.tcp_port", "port"),
    (MINIMAL + '[health]\nmax_error_rate = 5\n', "health.max_error_rate", "between 0 and 1"),
    (MINIMAL + '[labels]\nsite = 3\n', "labels", "must be a string"),
    ('device_id = "a"\nprofile = "x86-gpu"\n', "profile", "unknown profile"),
])
def test_every_error_names_the_file_and_the_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}"), message
    assert words in message
    assert info.value.exit_code == EX_CONFIG == 78


def test_unknown_key_is_an_error_with_the_closest_known_key(tmp_path):
    with pytest.raises(ConfigError, match=r"agent\.toml: helth: unknown key \(did you mean 'health'\?\)"):
        load_config(write(tmp_path, MINIMAL + "[helth]\nwindow_s = 5\n"))
    with pytest.raises(ConfigError, match=r"health\.window: unknown key \(did you mean 'window_s'\?\)"):
        load_config(write(tmp_path, MINIMAL + "[health]\nwindow = 5\n"))


def test_unknown_profile_suggests_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'x86-cpux': did you mean 'x86-cpu'"):
        load_config(write(tmp_path, 'device_id = "a"\nprofile = "x86-cpux"\n'))


def test_missing_file_and_bad_toml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(write(tmp_path, "device_id = \n", "bad.toml"))


def test_parse_config_from_text_names_the_source():
    with pytest.raises(ConfigError, match=r"^<env>: profile: required key is missing"):
        parse_config('device_id = "a"\n', "<env>")


def test_real_cli_exits_78_on_an_invalid_config(tmp_path, keys_dir):
    path = write(tmp_path, MINIMAL + "[api]\nport = 1\n")
    result = run_cli("agent", "install-bundle", str(tmp_path / "x.lfb"), "--config", str(path))
    assert result.returncode == 78, result.stderr
    assert f"{path}: api.port: unknown key (did you mean 'tcp_port'?)" in result.stderr
    missing = run_cli("agent", "install-bundle", str(tmp_path / "x.lfb"), "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 78
    assert "none.toml: config file not found" in missing.stderr
