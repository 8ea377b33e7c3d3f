"""``litefleet-agent install``: put the systemd unit, a default config and the directories in place.

Planning is separated from doing: :func:`plan` reads the target system (an image root or ``/``)
and returns the list of steps; :func:`apply` performs them. ``--dry-run`` prints the plan and
touches nothing, and tests look at plans without writing anything. The unit is rendered from
``systemd/litefleet-agent.service`` by :func:`render_unit`, a pure function.

An existing ``agent.toml`` is never overwritten: it may hold a device's identity. Neither is an
existing device X25519 key: bundles already encrypted for it would no longer open. A new key is
written root-only (0600) under ``/etc/litefleet/keys``; the unit hands it to the agent with
``LoadCredential=``, as it does the TLS key.
Ownership of the state directory is left to systemd (``StateDirectory=`` chowns it to
``User=`` at every start), so an image root needs no ``litefleet`` user at build time.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.config import X25519_CREDENTIAL
from agent.errors import AgentError

UNIT_NAME = "litefleet-agent.service"
DEFAULT_USER = "litefleet"
CONFIG_PATH = PurePosixPath("/etc/litefleet/agent.toml")
TLS_KEY_PATH = PurePosixPath("/etc/litefleet/tls/device.key")
X25519_KEY_PATH = PurePosixPath("/etc/litefleet/keys/device.x25519.key")   # agent.config.DEFAULT_X25519_KEY
API_TOKENS_PATH = PurePosixPath("/etc/litefleet/api-tokens")       # agent.access.DEFAULT_TOKENS_FILE
API_TOKENS_CREDENTIAL = "api-tokens"                                # agent.daemon.TOKENS_CREDENTIAL
API_GROUP = "litefleet-api"          # members may open the inference API's socket
API_SOCKET = PurePosixPath("/run/litefleet/api.sock")               # RuntimeDirectory=litefleet, mode 0755
UNIT_DIR = PurePosixPath("/etc/systemd/system")
SYSTEMD_STATE_DIR = PurePosixPath("/var/lib/litefleet")      # what StateDirectory=litefleet makes
DEFAULT_STATE_DIR = PurePosixPath("/var/lib/litefleet")
DEFAULT_TRUSTED_DIR = PurePosixPath("/etc/litefleet/trusted-keys")
NOLOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


class InstallSetupError(AgentError):
    """The agent cannot be installed as a service (unit template missing, not root, ...)."""


# finding things ----------------------------------------------------------------------------

def unit_template_path() -> Path:
    """The shipped unit: the source checkout's systemd/, else the installed data file."""
    candidates = [Path(__file__).resolve().parents[1] / "systemd" / UNIT_NAME,
                  Path(sys.prefix) / "share" / "litefleet" / "systemd" / UNIT_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise InstallSetupError("the unit template is missing; looked in "
                            + ", ".join(str(p) for p in candidates) + "; reinstall litefleet[device]")


def agent_command() -> list[str]:
    """How systemd should start *this* agent: the console script if there is one, else ``python -m``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 and argv0.name == "litefleet-agent" and argv0.is_file():
        return [str(argv0.resolve())]
    beside = Path(sys.executable).parent / "litefleet-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]   # keep the venv's bin path: resolving would lose the venv
    return [str(Path(sys.executable).absolute()), "-m", "agent.cli"]


def existing_groups(root: Path) -> set[str] | None:
    """Group names in the target's /etc/group, or None when it cannot be read."""
    try:
        text = (root / "etc" / "group").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return {line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def under(root: Path, path: PurePosixPath | str) -> Path:
    """``path`` (absolute on the target) inside ``root``."""
    return root / str(path).lstrip("/")


# rendering the unit (pure) ---------------------------------------------------------------

def _systemd_quote(arg: str) -> str:
    if arg and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _set(lines: list[str], key: str, value: str | None, note: str | None = None) -> None:
    """Replace the first ``key=`` line (``value`` None: comment it out), else append before [Install]."""
    for i, line in enumerate(lines):
        if line.startswith(f"{key}="):
            new = f"{key}={value}" if value is not None else f"#{line}"
            lines[i:i + 1] = ([f"# {note}"] if note else []) + [new]
            return
    if value is None:
        return
    at = lines.index("[Install]") if "[Install]" in lines else len(lines)
    while at > 0 and not lines[at - 1].strip():
        at -= 1
    lines[at:at] = ([f"# {note}"] if note else []) + [f"{key}={value}"]


def _set_credential(lines: list[str], name: str, path: PurePosixPath | str | None, note: str | None = None) -> None:
    """Point the ``LoadCredential={name}:`` line at ``path`` (None: comment it out with ``note``)."""
    for i, line in enumerate(lines):
        if line.startswith(f"LoadCredential={name}:"):
            new = f"LoadCredential={name}:{path}" if path is not None else f"#{line}"
            lines[i:i + 1] = ([f"# {note}"] if note and path is None else []) + [new]
            return
    if path is not None:
        at = lines.index("[Install]") if "[Install]" in lines else len(lines)
        while at > 0 and not lines[at - 1].strip():
            at -= 1
        lines.insert(at, f"LoadCredential={name}:{path}")


def render_unit(template: str, *, exec_argv: list[str], config_path: PurePosixPath | str = CONFIG_PATH,
                user: str = DEFAULT_USER, groups_present: set[str] | None = None,
                state_dir: PurePosixPath | str = DEFAULT_STATE_DIR,
                tls_key: PurePosixPath | str | None = TLS_KEY_PATH,
                x25519_key: PurePosixPath | str | None = X25519_KEY_PATH,
                api_tokens: PurePosixPath | str | None = None, socket_group: str | None = None) -> str:
    """The unit for this system. ``groups_present`` None keeps every supplementary group;
    ``tls_key`` None leaves the TLS key credential out (a device with no broker); ``x25519_key``
    None leaves the device's decryption key credential out. ``api_tokens``: the inference API's
    tokens file, handed over as the ``api-tokens`` credential; ``socket_group``: the API socket's
    group, added to SupplementaryGroups= so that the agent may give the socket to it."""
    lines = template.splitlines()
    if socket_group:
        for i, line in enumerate(lines):
            if line.startswith("SupplementaryGroups=") and socket_group not in line.split("=", 1)[1].split():
                lines[i] = f"{line} {socket_group}"
                break
    command = " ".join(_systemd_quote(a) for a in [*exec_argv, "run", "--config", str(config_path)])
    _set(lines, "ExecStart", command)
    _set(lines, "User", user)
    _set(lines, "Group", user)
    for line in lines:
        if line.startswith("SupplementaryGroups=") and groups_present is not None:
            wanted = line.split("=", 1)[1].split()
            kept = [g for g in wanted if g in groups_present]
            dropped = [g for g in wanted if g not in groups_present]
            note = f"not on this system: {' '.join(dropped)}" if dropped else None
            _set(lines, "SupplementaryGroups", " ".join(kept) if kept else None, note)
            break
    if str(exec_argv[0]).startswith(("/home/", "/root/", "/run/user/")):
        _set(lines, "ProtectHome", "read-only",
             f"the agent runs from {exec_argv[0]}; install it under /opt or /usr to use ProtectHome=yes")
    if PurePosixPath(state_dir) != SYSTEMD_STATE_DIR:
        _set(lines, "ReadWritePaths", str(state_dir), "agent.toml's state_dir (ProtectSystem=strict makes "
                                                       "everything else read-only)")
    if tls_key is None:
        _set_credential(lines, "device.key", None, "no broker configured and no TLS key yet: re-run "
                                                   "`litefleet-agent install` once the key is provisioned")
    else:
        _set_credential(lines, "device.key", tls_key)
    _set_credential(lines, X25519_CREDENTIAL, x25519_key, "no device X25519 key: encrypted bundles cannot be "
                                                          "installed")
    if api_tokens is not None:
        _set_credential(lines, API_TOKENS_CREDENTIAL, api_tokens)
    return "\n".join(lines) + "\n"


# the plan ------------------------------------------------------------------------------

@dataclass
class Step:
    action: str                  # "write" | "keep" | "mkdir" | "run" | "note"
    target: str                  # a path or a command line
    detail: str = ""
    mode: int | None = None
    content: str | None = field(default=None, repr=False)
    argv: list[str] | None = None

    def describe(self) -> str:
        mode = f" (mode {self.mode:04o})" if self.mode is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.action:5} {self.target}{mode}{detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "detail": self.detail,
                "mode": f"{self.mode:04o}" if self.mode is not None else None}


@dataclass
class Plan:
    root: Path
    steps: list[Step]
    next_commands: list[list[str]]
    warnings: list[str]


def _config_paths(text: str) -> dict[str, str]:
    """The few settings install needs, read leniently: full validation needs the target's files."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}
    broker = doc.get("broker") if isinstance(doc.get("broker"), dict) else {}
    out = {"state_dir": doc.get("state_dir"), "trusted_keys_dir": doc.get("trusted_keys_dir"),
           "broker_url": broker.get("url"), "key_file": broker.get("key_file"),
           "x25519_key_file": doc.get("x25519_key_file")}
    api = doc.get("api") if isinstance(doc.get("api"), dict) else {}
    out.update(socket_group=api.get("socket_group"), tokens_file=api.get("tokens_file"))
    return {k: v for k, v in out.items() if isinstance(v, str) and v}


def _abs(value: str | None, default: PurePosixPath) -> PurePosixPath:
    if value and value.startswith("/"):
        return PurePosixPath(value)
    if value:   # relative paths in agent.toml are relative to its directory
        return CONFIG_PATH.parent / value
    return default


def plan(root: Path = Path("/"), *, user: str = DEFAULT_USER, config_only: bool = False,
         exec_argv: list[str] | None = None, device_id: str | None = None, profile: str | None = None,
         tls_credential: bool = True, enable: bool = False) -> Plan:
    """What installing into ``root`` means on this system; reads but writes nothing."""
    from agent.config import default_config_text

    root = Path(root)
    live = root.resolve() == Path("/")
    steps: list[Step] = []
    warnings: list[str] = []

    config_file = under(root, CONFIG_PATH)
    if config_file.exists():
        config_text = config_file.read_text(encoding="utf-8", errors="replace")
        steps.append(Step("keep", str(config_file), "exists; not overwritten"))
    else:
        kwargs: dict[str, Any] = {"device_id": device_id}
        if profile:
            kwargs["profile"] = profile
        if not config_only or under(root, X25519_KEY_PATH).exists():
            kwargs["x25519_key_file"] = str(X25519_KEY_PATH)   # made below
        kwargs.update(unix_socket=str(API_SOCKET), socket_group=API_GROUP)   # group made below
        config_text = default_config_text(**kwargs)
        steps.append(Step("write", str(config_file), "default config: edit device_id, profile, [broker]",
                          mode=0o644, content=config_text))
    settings = _config_paths(config_text)
    if config_file.exists() and not settings:
        warnings.append(f"{config_file}: could not read it as TOML; using default paths for the unit")
    if config_only:
        return Plan(root, steps, [], warnings)

    state_dir = _abs(settings.get("state_dir"), DEFAULT_STATE_DIR)
    trusted_dir = _abs(settings.get("trusted_keys_dir"), DEFAULT_TRUSTED_DIR)
    tls_key = _abs(settings.get("key_file"), TLS_KEY_PATH)
    x25519_key = _abs(settings.get("x25519_key_file"), X25519_KEY_PATH)
    for path, mode, why in ((state_dir, 0o750, "models, spool, API socket (systemd chowns it to the user)"),
                            (trusted_dir, 0o755, "put release/operator/root *.pub here"),
                            (tls_key.parent, 0o755, "the device's TLS key (mode 0600, root) goes here"),
                            (x25519_key.parent, 0o755, "the device's X25519 key pair")):
        target = under(root, path)
        if not target.is_dir() and not any(s.target == str(target) for s in steps):
            steps.append(Step("mkdir", str(target), why, mode=mode))
    steps.extend(_x25519_steps(under(root, x25519_key)))
    api_tokens = _abs(settings.get("tokens_file"), API_TOKENS_PATH)
    steps.append(_tokens_step(under(root, api_tokens)))
    if config_file.exists() and not settings.get("x25519_key_file"):
        warnings.append(f"{config_file} sets no x25519_key_file: under systemd the agent gets {x25519_key} as a "
                        f"credential anyway; add x25519_key_file = \"{x25519_key}\" for runs outside systemd")

    key_present = under(root, tls_key).is_file()
    credential: PurePosixPath | None = tls_key
    if not tls_credential:
        credential = None
    elif not key_present:
        if settings.get("broker_url"):
            warnings.append(f"{tls_key} does not exist: the service will fail to start (243/CREDENTIALS) "
                            "until the device's TLS key is there (mode 0600, owner root)")
        else:
            credential = None
            warnings.append(f"no broker configured and no {tls_key}: the unit is written without the TLS "
                            "key credential; re-run install after provisioning the key")

    argv = exec_argv or agent_command()
    groups = existing_groups(root)
    if groups is None:
        warnings.append(f"cannot read {under(root, '/etc/group')}: keeping every SupplementaryGroups= "
                        "entry; a group that does not exist stops the service from starting")
    socket_group = settings.get("socket_group")
    group_steps: list[Step] = []
    if socket_group and groups is not None and socket_group not in groups:
        groupadd = ["groupadd", "--system", socket_group]
        if live and os.geteuid() == 0:
            group_steps.append(Step("run", shlex.join(groupadd), "the group whose members may use the inference "
                                                                 "API's socket", argv=groupadd))
            groups = groups | {socket_group}
        else:
            why = "on the target system" if not live else "as root"
            group_steps.append(Step("note", shlex.join(groupadd), f"the API socket's group {socket_group} does not "
                                                                  f"exist; run this {why}, then install again"))
            warnings.append(f"group {socket_group} (api.socket_group) does not exist: the agent will refuse to start "
                            f"until it does; run `groupadd --system {socket_group}` and install again")
    unit = render_unit(unit_template_path().read_text(encoding="utf-8"), exec_argv=argv, user=user,
                       groups_present=groups, state_dir=state_dir, tls_key=credential, x25519_key=x25519_key,
                       api_tokens=api_tokens, socket_group=socket_group)
    unit_file = under(root, UNIT_DIR / UNIT_NAME)
    steps.append(Step("write", str(unit_file), f"ExecStart={shlex.join(argv)} run --config {CONFIG_PATH}",
                      mode=0o644, content=unit))

    useradd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(state_dir),
               "--shell", next((s for s in NOLOGIN if Path(s).exists()), NOLOGIN[0]), user]
    if not _user_exists(root, user, live):
        if live and os.geteuid() == 0:
            steps.append(Step("run", shlex.join(useradd), "create the service user", argv=useradd))
        else:
            why = "on the target system" if not live else "as root"
            steps.append(Step("note", shlex.join(useradd), f"the user {user} does not exist; run this {why}"))
    steps.extend(group_steps)

    commands = [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "litefleet-agent"]]
    if enable:
        if not live:
            raise InstallSetupError("--enable needs the live system: it cannot start a service inside --root")
        steps.extend(Step("run", shlex.join(c), argv=c) for c in commands)
        commands = []
    return Plan(root, steps, commands, warnings)


def _tokens_step(path: Path) -> Step:
    """Keep the inference API's tokens file, or write one with a fresh token (root only, 0600)."""
    if path.exists():
        return Step("keep", str(path), "the inference API's bearer tokens exist; not replaced")
    from agent.access import tokens_file_text
    return Step("write", str(path), "bearer tokens for the inference API's TCP listener (used when api.tcp_port "
                                    "is set; the unit hands the file to the agent by LoadCredential=)",
                mode=0o600, content=tokens_file_text())


def _x25519_steps(private_file: Path) -> list[Step]:
    """Keep the device's key pair if it has one, else make one: the private half root-only (0600)."""
    from agent.protocol import keys
    public_file = private_file.with_name(private_file.name.removesuffix(keys.X25519_PRIVATE_SUFFIX)
                                         + keys.X25519_PUBLIC_SUFFIX)
    if private_file.exists():
        return [Step("keep", str(private_file), "the device's X25519 key exists; not replaced (bundles are "
                                                "encrypted for it)")]
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    private_key = X25519PrivateKey.generate()
    public_key = private_key.public_key()
    return [Step("write", str(private_file), "the device's X25519 private key (root only; the unit hands it to "
                                             "the agent by LoadCredential=)", mode=0o600,
                 content=keys.x25519_private_pem(private_key).decode("ascii")),
            Step("write", str(public_file), f"its public key, id {keys.x25519_key_id(public_key)}, reported in the "
                                            f"birth message: encrypt for it with --encrypt-for", mode=0o644,
                 content=keys.x25519_public_pem(public_key).decode("ascii"))]


def _user_exists(root: Path, user: str, live: bool) -> bool:
    if live:
        try:
            pwd.getpwnam(user)
            return True
        except KeyError:
            return False
    try:
        text = (root / "etc" / "passwd").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.split(":", 1)[0] == user for line in text.splitlines())


# doing it ------------------------------------------------------------------------------

def apply(p: Plan) -> None:
    """Perform the plan's steps in order; files are written atomically (temp file + rename)."""
    for step in p.steps:
        try:
            _apply_step(step)
        except OSError as exc:
            raise InstallSetupError(f"{step.action} {step.target}: {exc.strerror or exc}; nothing after "
                                    "this step was done (steps before it were)") from exc


def _apply_step(step: Step) -> None:
    if step.action == "mkdir":
        path = Path(step.target)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, step.mode or 0o755)
    elif step.action == "write":
        _write_atomic(Path(step.target), step.content or "", step.mode or 0o644)
    elif step.action == "run" and step.argv:
        result = subprocess.run(step.argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallSetupError(f"`{step.target}` failed (exit {result.returncode}): "
                                    f"{result.stderr.strip() or result.stdout.strip()}")


def _write_atomic(path: Path, content: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["Plan", "Step", "InstallSetupError", "plan", "apply", "render_unit", "agent_command",
           "unit_template_path", "existing_groups"]
