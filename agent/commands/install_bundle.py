"""``litefleet-agent install-bundle FILE``: install a signed bundle from a local file.

For a device without a fleet connection, for first provisioning, and for the crash tests. It
runs the same pipeline the MQTT transport uses. Without a config file, ``--state-dir``,
``--trust-dir`` and ``--profile`` say everything needed.

Exit status: 0 installed, 1 refused or failed (the previous model stays active), 78 when the
configuration is invalid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent import inbox
from agent.clikit import print_json
from agent.config import DEFAULT_CONFIG_PATH, load_config
from agent.errors import ConfigError
from agent.events import EventLog
from agent.installer import Installer
from agent.protocol import keys, profiles
from agent.protocol.errors import KeyFileError, ProfileError
from agent.store import ModelStore

EXIT_REFUSED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "install-bundle", help="verify and install a signed model bundle from a file",
        description="Verify FILE's signature against the trusted release keys, check it fits this device "
                    "(profile, agent version, newer than the active model, disk and memory), then stage, "
                    "load, smoke-test and atomically activate it. On any refusal the active model stays "
                    "and the command exits 1 with the reason.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--config", type=Path, default=None,
                   help=f"agent config (default {DEFAULT_CONFIG_PATH}, optional when the three options "
                        f"below are given)")
    p.add_argument("--state-dir", type=Path, help="model store directory (overrides the config)")
    p.add_argument("--trust-dir", type=Path, help="directory of trusted public keys (overrides the config)")
    p.add_argument("--profile", help="device profile name or .toml path (overrides the config)")
    p.add_argument("--profiles-dir", type=Path, help="where profiles live (overrides the config)")
    p.add_argument("--x25519-key", type=Path, metavar="KEY",
                   help="the device's X25519 private key, to open an encrypted bundle (overrides the config's "
                        "x25519_key_file)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=_install_bundle)


def _settings(args: argparse.Namespace) -> tuple[Path, Path, profiles.Profile, Any]:
    """State dir, trust dir, profile and the config (or None) from the config file and the command line."""
    config = None
    if args.config is not None or DEFAULT_CONFIG_PATH.exists() or not (args.state_dir and args.trust_dir
                                                                         and args.profile):
        path = args.config or DEFAULT_CONFIG_PATH
        if args.config is None and not path.exists():
            raise ConfigError(f"{path}: config file not found; pass --config PATH, or all of --state-dir, "
                              f"--trust-dir and --profile")
        config = load_config(path)
    state_dir = args.state_dir or config.state_dir
    trust_dir = args.trust_dir or config.trusted_keys_dir
    if args.profile or args.profiles_dir:
        name = args.profile or config.profile
        directory = args.profiles_dir or (config.profiles_dir if config else None) or None
        try:
            profile = profiles.load_profile(name, directory)
        except ProfileError as exc:
            raise ConfigError(f"--profile: {exc}") from None
    else:
        profile = config.load_profile()
    return state_dir, trust_dir, profile, config


def _x25519_key(args: argparse.Namespace, config: Any) -> Any:
    """The key that opens encrypted bundles: --x25519-key, else the config's, else None."""
    if args.x25519_key:
        try:
            return keys.load_x25519_private(args.x25519_key)
        except KeyFileError as exc:
            raise ConfigError(f"--x25519-key: {exc}") from None
    return config.load_x25519_key() if config else None


def _install_bundle(args: argparse.Namespace) -> int:
    state_dir, trust_dir, profile, config = _settings(args)
    if inbox.daemon_running(state_dir):
        return _through_daemon(args, state_dir)
    try:
        trusted = keys.load_trusted_dir(trust_dir)
    except KeyFileError as exc:
        raise ConfigError(f"trusted keys: {exc}") from None
    log = EventLog()
    store = ModelStore(state_dir)
    installer = Installer(store, trusted, profile, events=log, decryption_key=_x25519_key(args, config))
    result = installer.install_file(args.file)
    if result.loaded is not None:
        result.loaded.close()
    if args.json:
        print_json({**result.to_dict(), "events": [e.to_dict() for e in log.events],
                    "recovered": store.recovered, "store": store.status()})
    elif result.ok:
        print(result.message)
    if not result.ok:
        print(f"litefleet-agent: install refused ({result.code}): {result.message}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def _through_daemon(args: argparse.Namespace, state_dir: Path) -> int:
    """The daemon owns the store: let it install, so it also switches the model it serves."""
    result = inbox.submit(state_dir, args.file)
    if args.json:
        print_json({**result, "via": "daemon"})
    elif result.get("ok"):
        print(result.get("message"))
    if not result.get("ok"):
        print(f"litefleet-agent: install refused ({result.get('code')}): {result.get('message')}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
