"""The unit file, checked by systemd's own tools: ``systemd-analyze verify`` and ``security``.

The installed unit (from the real ``litefleet-agent install``) must verify and keep an exposure
score of at most 2.0 while still letting the agent reach its accelerators (DeviceAllow=).
Skipped only when systemd-analyze is not installed (it is on Debian 12 with systemd 252).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is not installed on this machine")
MAX_EXPOSURE = 2.0
TEMPLATE = ROOT / "systemd" / "litefleet-agent.service"


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=120)


def exposure(unit: Path) -> float:
    proc = analyze("security", "--offline=true", str(unit))
    out = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert match, f"no exposure score in systemd-analyze output:\n{out}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def installed_unit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    proc = run_cli("agent", "install", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    # a copy named like the real unit, outside /etc, so verify looks at this file only
    unit = tmp_path_factory.mktemp("units") / "litefleet-agent.service"
    unit.write_text((root / "etc/systemd/system/litefleet-agent.service").read_text())
    return unit


@needs_analyze
def test_installed_unit_verifies(installed_unit):
    proc = analyze("verify", str(installed_unit))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "litefleet-agent.service" not in proc.stderr, proc.stderr   # no warnings about our unit


@needs_analyze
def test_verify_catches_a_bad_exec_start(tmp_path, installed_unit):
    """Proof that the check above is a real one: a missing executable fails verification."""
    bad = tmp_path / "litefleet-agent.service"
    bad.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={tmp_path}/no-such-agent",
                          installed_unit.read_text()))
    proc = analyze("verify", str(bad))
    assert proc.returncode != 0
    assert "no-such-agent" in proc.stderr


@needs_analyze
def test_installed_unit_exposure_is_at_most_2(installed_unit):
    score = exposure(installed_unit)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"
    # systemd-analyze agrees (its threshold is the score x 10): exit 0 means "not above"
    assert analyze("security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                   str(installed_unit)).returncode == 0


@needs_analyze
def test_shipped_template_exposure_is_at_most_2():
    assert exposure(TEMPLATE) <= MAX_EXPOSURE


@needs_analyze
def test_security_score_reacts_to_weakening(tmp_path):
    """Dropping the sandbox raises the score: the parser reads the real number."""
    text = TEMPLATE.read_text()
    weak = re.sub(r"(?m)^(ProtectSystem|ProtectHome|SystemCallFilter|CapabilityBoundingSet|User|Group)=.*$",
                  "", text)
    unit = tmp_path / "litefleet-agent.service"
    unit.write_text(weak)
    assert exposure(unit) > exposure(TEMPLATE) + 2


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_keeps_accelerators_reachable_and_restarts_sanely():
    d = directives(TEMPLATE.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]                  # EX_CONFIG: no restart loop
    # PrivateDevices=yes would hide /dev/apex_0, /dev/bus/usb, /dev/dri: the device cgroup is used instead
    assert "PrivateDevices" not in d and d["DevicePolicy"] == ["closed"]
    allowed = " ".join(d["DeviceAllow"])
    for node in ("/dev/apex_0", "char-usb_device", "char-drm", "/dev/mali0", "/dev/nvmap", "/dev/nvhost-gpu"):
        assert node in allowed
    assert d["RestrictAddressFamilies"][0].split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert "device.key:/etc/litefleet/tls/device.key" in d["LoadCredential"]
    assert "device.x25519.key:/etc/litefleet/keys/device.x25519.key" in d["LoadCredential"]
    assert "api-tokens:/etc/litefleet/api-tokens" in d["LoadCredential"]     # the inference API's tokens
    assert d["RuntimeDirectoryMode"] == ["0755"] and d["StateDirectoryMode"] == ["0750"]   # socket, not state
    assert d["StateDirectory"] == ["litefleet"] and d["RuntimeDirectory"] == ["litefleet"]
    assert d["User"] == ["litefleet"]
