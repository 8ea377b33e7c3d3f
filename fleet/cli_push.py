"""``litefleet push``, ``litefleet rollback`` and ``litefleet device-config``: signed commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from agent.clikit import print_json
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys
from agent.protocol.commands import make_command
from agent.protocol.manifest import Manifest, check_model
from agent.protocol.topics import Topics
from fleet import push
from fleet.cli_server import load_trust
from fleet.link import add_broker_options, open_link
from fleet.repository import BlobStore


def _target(text: str) -> push.Target:
    try:
        return push.parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return push.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, type=_target, metavar="device:ID|group:NAME|profile:NAME|all")
    p.add_argument("--fleet", required=True, help="fleet name (topic prefix lf/v1/FLEET/)")
    p.add_argument("--operator-key", required=True, type=Path, metavar="KEY", help="the operator's private key")
    p.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding the key's passphrase")
    p.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                   help="how long the command stays valid, e.g. 30m, 1h (default: 1h)")
    p.add_argument("--wait", action="store_true", help="follow every target device until it finished")
    p.add_argument("--timeout", type=_duration, default=600.0, metavar="DURATION",
                   help="with --wait: give up after this long, exit 2 (default: 10m)")
    p.add_argument("--json", action="store_true")
    add_broker_options(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push", help="deploy a bundle to devices (signed command over MQTT)",
        description="Verify BUNDLE, optionally add it to the repository (--repo), and publish a signed deploy "
                    "command, retained, on the target's command topic: devices that are offline get it when they "
                    "return (within --ttl). The fleet server must serve the bundle's blob. With --wait, show each "
                    "target device's progress; exit 0 when all installed, 1 if any refused or failed, 2 on timeout.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--repo", type=Path, metavar="DIR", help="also add the bundle to this repository directory")
    p.add_argument("--trust", nargs="+", type=Path, metavar="PUBKEY|DIR",
                   help="trusted release key(s) to verify the bundle's signature (required with --repo)")
    _common(p)
    p.set_defaults(func=_push)

    r = subparsers.add_parser("rollback", help="make devices go back to their previous model",
                              description="Publish a signed rollback command (retained, like push).")
    r.add_argument("--reason", default="operator requested a rollback")
    _common(r)
    r.set_defaults(func=_rollback)

    c = subparsers.add_parser("device-config", help="change devices' run-time settings",
                              description="Publish a signed config command, e.g. telemetry_interval_s=10. "
                                          "Values are JSON (numbers, true/false) or else strings.")
    c.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    _common(c)
    c.set_defaults(func=_config)


# --- commands ---------------------------------------------------------------------------------------

def _push(args: argparse.Namespace) -> int:
    parts = bundle_mod.read_bundle(args.bundle)
    if args.repo and not args.trust:
        raise push.PushError("--repo needs --trust: the repository stores only bundles it verified")
    if args.trust:
        trusted = load_trust(args.trust)
        manifest = bundle_mod.verify(parts, trusted).manifest
    else:  # no keys to check the signature with: the device will; check what can be checked
        manifest = Manifest.parse(parts.manifest_bytes, f"{args.bundle}: manifest.json")
        check_model(manifest, parts.model)
    if args.target.scope == "profile" and args.target.name != manifest.profile:
        raise push.PushError(f"{args.bundle} is built for profile {manifest.profile!r}; devices of profile "
                             f"{args.target.name!r} would refuse it")
    if args.repo:
        BlobStore(args.repo, trusted).add_bundle(args.bundle)
    return _send(args, "deploy", push.deploy_args(manifest, parts.manifest_bytes),
                 f"deploy {manifest.name} v{manifest.version} ({manifest.profile}, "
                 f"blob {bundle_mod.blob_id(parts.manifest_bytes)[:12]})")


def _rollback(args: argparse.Namespace) -> int:
    return _send(args, "rollback", {"reason": args.reason}, f"rollback ({args.reason})")


def _config(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise push.PushError(f"setting {item!r} must look like KEY=VALUE, e.g. telemetry_interval_s=10")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return _send(args, "config", settings, f"config {settings}")


def _send(args: argparse.Namespace, action: str, command_args: dict[str, Any], what: str) -> int:
    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise keys.KeyFileError(f"environment variable {args.passphrase_env} is not set")
        passphrase = value.encode()
    operator_key = keys.load_private(args.operator_key, passphrase)
    topics = Topics(args.fleet)
    target: push.Target = args.target
    seq = push.next_seq()
    command = make_command(action, command_args, fleet=args.fleet, scope=target.scope, name=target.name,
                           operator_key=operator_key, seq=seq, ttl_s=args.ttl)
    command_id = command["body"]["id"]
    progress = push.Progress(target, command_id, action)
    lock, changed = threading.Lock(), threading.Event()
    link = open_link(args, prefix="litefleet-operator")
    try:
        if args.wait:
            push.watch_fleet(link, topics, progress, changed.set, lock)
        topic = push.publish_command(link, topics, target, command, ttl_s=args.ttl)
        if not args.json:
            print(f"sent {what} to {target} as command {command_id} (seq {seq}) on {topic}", flush=True)
        code = push.EXIT_OK
        if args.wait:
            renderer = _renderer(args.json)
            try:
                code = push.follow(progress, lock, changed, timeout_s=args.timeout,
                                   render=lambda: renderer.update(progress, lock))
            finally:
                renderer.close(progress, lock)
    finally:
        link.stop(timeout=5)
    with lock:
        doc = {"command_id": command_id, "seq": seq, "action": action, "target": str(target), "topic": topic,
               "expires_at": command["body"]["expires_at"], "exit_code": code}
        if args.wait:
            doc.update(progress.to_dict(), unanswered=progress.unanswered())
    if args.json:
        print_json(doc)
    elif args.wait:
        _summary(progress, code, args.timeout)
    return code


def _summary(progress: push.Progress, code: int, timeout_s: float) -> None:
    rows = list(progress.rows.values())
    ok = sum(r.ok for r in rows)
    bad = [r.device_id for r in rows if r.final and not r.ok]
    if code == push.EXIT_TIMEOUT:
        missing = progress.unanswered()
        print(f"timed out after {timeout_s:g}s: " + (f"no final answer from {', '.join(missing)}" if missing
                                                      else "no target device found (no matching status message)"))
    print(f"{ok} of {len(rows)} device(s) done" + (f"; failed or refused: {', '.join(bad)}" if bad else ""))


# --- output -------------------------------------------------------------------------------------------

class _PlainRenderer:
    """One line per change of a device's state (logs, pipes, CI)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.shown: dict[str, tuple] = {}

    def update(self, progress: push.Progress, lock: threading.Lock) -> None:
        if self.quiet:
            return
        with lock:
            rows = [r.to_dict() for r in progress.rows.values()]
        for row in sorted(rows, key=lambda r: r["device_id"]):
            key = (row["state"], row["percent"] if row["state"] == "fetching" else None, row["online"])
            if self.shown.get(row["device_id"]) == key:
                continue
            self.shown[row["device_id"]] = key
            print(_line(row), flush=True)

    def close(self, progress: push.Progress, lock: threading.Lock) -> None:
        self.update(progress, lock)


class _RichRenderer:
    """A live-updating table on a terminal."""

    def __init__(self) -> None:
        from rich.live import Live
        self._live = Live(refresh_per_second=4, transient=False)
        self._live.start()

    def update(self, progress: push.Progress, lock: threading.Lock) -> None:
        from rich.table import Table
        with lock:
            rows = [r.to_dict() for r in progress.rows.values()]
        table = Table("device", "online", "state", "progress", "detail")
        for row in sorted(rows, key=lambda r: r["device_id"]):
            style = "green" if row["ok"] else ("red" if row["final"] else "")
            table.add_row(row["device_id"], {True: "yes", False: "no", None: "?"}[row["online"]],
                          f"[{style}]{row['state']}[/]" if style else row["state"],
                          "" if row["percent"] is None else f"{row['percent']}%", row["detail"][:80])
        self._live.update(table)

    def close(self, progress: push.Progress, lock: threading.Lock) -> None:
        self.update(progress, lock)
        self._live.stop()


def _line(row: dict[str, Any]) -> str:
    state = row["state"]
    if state == "fetching" and row["percent"] is not None:
        state = f"fetching {row['percent']}%"
    online = {True: "", False: " (offline)", None: " (no status yet)"}[row["online"]]
    detail = f": {row['detail']}" if row["detail"] and row["final"] else ""
    return f"{row['device_id']}{online} {state}{detail}"


def _renderer(json_output: bool) -> Any:
    if not json_output and sys.stdout.isatty():
        try:
            return _RichRenderer()
        except ImportError:
            pass
    return _PlainRenderer(quiet=json_output)
