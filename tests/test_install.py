"""``litefleet-agent install --root DIR``: the real CLI installing into a directory tree."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.install import render_unit, unit_template_path
from tests.conftest import run_cli

UNIT = Path("etc/systemd/system/litefleet-agent.service")
CONFIG = Path("etc/litefleet/agent.toml")


def make_root(tmp_path: Path, groups: tuple[str, ...] = ("plugdev", "video"), users: tuple[str, ...] = ()) -> Path:
    """An image root whose /etc/group has only some of the accelerator groups."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("".join(f"{g}:x:{100 + i}:\n" for i, g in enumerate(("root", *groups))))
    (root / "etc/passwd").write_text("".join(f"{u}:x:{500 + i}:{500 + i}::/:/bin/false\n"
                                             for i, u in enumerate(("root", *users))))
    return root


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def credentials(text: str) -> dict[str, str]:
    """The unit's LoadCredential= lines as {credential name: path}."""
    return dict(value.split(":", 1) for value in unit_values(text, "LoadCredential"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_unit_config_and_directories(tmp_path):
    root = make_root(tmp_path)
    proc = run_cli("agent", "install", "--root", str(root), "--device-id", "pi-7")
    assert proc.returncode == 0, proc.stderr

    unit = (root / UNIT).read_text()
    exec_start = unit_values(unit, "ExecStart")[0].split()
    assert Path(exec_start[0]).is_absolute() and os.access(exec_start[0], os.X_OK)
    assert exec_start[-3:] == ["run", "--config", "/etc/litefleet/agent.toml"]
    assert unit_values(unit, "User") == ["litefleet"] and unit_values(unit, "Group") == ["litefleet"]
    # render and apex are not in this root's /etc/group: a missing group would fail the unit (216/GROUP)
    assert unit_values(unit, "SupplementaryGroups") == ["plugdev video"]
    assert unit_values(unit, "Type") == ["notify"]
    assert mode(root / UNIT) == 0o644

    config_text = (root / CONFIG).read_text()
    config = parse_config(config_text, "/etc/litefleet/agent.toml")
    assert config.device_id == "pi-7"
    assert mode(root / "var/lib/litefleet") == 0o750
    trusted = root / str(config.trusted_keys_dir).lstrip("/")
    assert trusted.is_dir()
    assert (root / "etc/litefleet/tls").is_dir()

    # no broker and no key yet: the credential is left out, and the user is told why
    assert "device.key" not in credentials(unit)
    assert "#LoadCredential=device.key:/etc/litefleet/tls/device.key" in unit
    assert "no broker configured" in proc.stderr
    # not run as root on the live system: the useradd command is printed, not run
    assert "useradd --system" in proc.stdout and "litefleet" in proc.stdout
    assert "systemctl daemon-reload" in proc.stdout
    assert "systemctl enable --now litefleet-agent" in proc.stdout


def test_existing_config_is_not_overwritten(tmp_path):
    root = make_root(tmp_path)
    (root / CONFIG).parent.mkdir(parents=True)
    mine = 'device_id = "keep-me"\nstate_dir = "/srv/lf"\n[broker]\nurl = "mqtts://broker:8883"\n'
    (root / CONFIG).write_text(mine)
    proc = run_cli("agent", "install", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert (root / CONFIG).read_text() == mine
    assert "not overwritten" in proc.stdout
    unit = (root / UNIT).read_text()
    # the config's own state_dir is created and made writable despite ProtectSystem=strict
    assert (root / "srv/lf").is_dir()
    assert unit_values(unit, "ReadWritePaths") == ["/srv/lf"]
    # a broker is configured but the key is missing: credential kept, loud warning
    assert credentials(unit)["device.key"] == "/etc/litefleet/tls/device.key"
    assert "243/CREDENTIALS" in proc.stderr


def test_provisioned_key_is_passed_as_a_credential(tmp_path):
    root = make_root(tmp_path, users=("litefleet",))
    key = root / "etc/litefleet/tls/device.key"
    key.parent.mkdir(parents=True)
    key.write_text("PRIVATE")
    key.chmod(0o600)
    proc = run_cli("agent", "install", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    unit = (root / UNIT).read_text()
    assert credentials(unit)["device.key"] == "/etc/litefleet/tls/device.key"
    assert "useradd" not in proc.stdout            # the user exists in this root
    assert mode(key) == 0o600                      # untouched


def test_dry_run_writes_nothing_and_lists_everything(tmp_path):
    root = make_root(tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    proc = run_cli("agent", "install", "--root", str(root), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    for path in (UNIT, CONFIG, Path("var/lib/litefleet")):
        assert str(root / path) in proc.stdout
    assert "would do" in proc.stdout


def test_config_only(tmp_path):
    root = make_root(tmp_path)
    proc = run_cli("agent", "install", "--root", str(root), "--config-only", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [s["action"] for s in plan["steps"]] == ["write"]
    assert (root / CONFIG).is_file()
    assert not (root / UNIT).exists() and not (root / "var").exists()


def test_other_user_and_explicit_executable(tmp_path):
    root = make_root(tmp_path)
    exe = tmp_path / "bin" / "litefleet-agent"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    proc = run_cli("agent", "install", "--root", str(root), "--user", "edge", "--exec", str(exe),
                   "--no-tls-credential")
    assert proc.returncode == 0, proc.stderr
    unit = (root / UNIT).read_text()
    assert unit_values(unit, "User") == ["edge"] and unit_values(unit, "Group") == ["edge"]
    assert unit_values(unit, "ExecStart") == [f"{exe} run --config /etc/litefleet/agent.toml"]
    assert "device.key" not in credentials(unit)
    assert "useradd" in proc.stdout and proc.stdout.rstrip().count("edge") >= 1


def test_enable_refuses_an_image_root(tmp_path):
    root = make_root(tmp_path)
    proc = run_cli("agent", "install", "--root", str(root), "--enable")
    assert proc.returncode != 0
    assert "--enable needs the live system" in proc.stderr
    assert not (root / UNIT).exists()


def test_render_unit_for_a_home_install_relaxes_protect_home():
    """A venv in /home (common on a Pi) would be invisible under ProtectHome=yes (203/EXEC)."""
    text = unit_template_path().read_text()
    unit = render_unit(text, exec_argv=["/home/pi/venv/bin/litefleet-agent"], groups_present=None)
    assert unit_values(unit, "ProtectHome") == ["read-only"]
    assert unit_values(unit, "SupplementaryGroups") == ["plugdev video render apex"]
    spaced = render_unit(text, exec_argv=["/opt/lite fleet/bin/litefleet-agent"], groups_present={"video"})
    assert unit_values(spaced, "ExecStart") == ['"/opt/lite fleet/bin/litefleet-agent" run --config '
                                                '/etc/litefleet/agent.toml']
    assert unit_values(spaced, "SupplementaryGroups") == ["video"]
    assert unit_values(spaced, "ProtectHome") == ["yes"]


def test_unusable_root_fails_with_a_clear_message(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "var").write_text("a file where a directory must be")
    proc = run_cli("agent", "install", "--root", str(root))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"mkdir {root}/var/lib/litefleet" in proc.stderr


def test_install_writes_api_tokens_and_gives_the_socket_to_a_group(tmp_path):
    """The inference API: socket in /run/litefleet for group litefleet-api, a 0600 tokens file for TCP."""
    from agent.access import TokenSet
    root = make_root(tmp_path, groups=("plugdev", "litefleet-api"))
    proc = run_cli("agent", "install", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    config = parse_config((root / CONFIG).read_text(), "/etc/litefleet/agent.toml")
    assert config.api.tcp_port == 0                                    # TCP off unless configured
    assert config.api.socket_group == "litefleet-api"
    assert config.api.unix_socket == "/run/litefleet/api.sock"
    tokens = root / "etc/litefleet/api-tokens"
    assert mode(tokens) == 0o600 and len(TokenSet.load(tokens)) == 1  # one fresh token, every model
    unit = (root / UNIT).read_text()
    assert credentials(unit)["api-tokens"] == "/etc/litefleet/api-tokens"
    assert unit_values(unit, "SupplementaryGroups") == ["plugdev litefleet-api"]
    assert unit_values(unit, "RuntimeDirectoryMode") == ["0755"]      # apps reach the socket, not the state

    # installing again keeps the tokens applications were given
    before = tokens.read_text()
    assert run_cli("agent", "install", "--root", str(root)).returncode == 0
    assert tokens.read_text() == before

    # a root without the group: the command to make it is printed, and the unit does not name it yet
    other = make_root(tmp_path / "other")
    proc = run_cli("agent", "install", "--root", str(other))
    assert proc.returncode == 0, proc.stderr
    assert "groupadd --system litefleet-api" in proc.stdout and "litefleet-api" in proc.stderr
    assert "litefleet-api" not in unit_values((other / UNIT).read_text(), "SupplementaryGroups")[0]
