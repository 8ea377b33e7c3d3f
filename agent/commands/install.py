"""``litefleet-agent install``: install the agent as a systemd service (see agent/install.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from agent import install as install_mod
from agent.clikit import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "install", help="install the systemd unit, a default config and the state directories",
        description="Write /etc/systemd/system/litefleet-agent.service (ExecStart= pointing at this "
                    "litefleet-agent), /etc/litefleet/agent.toml (never overwritten), the state and "
                    "trusted-key directories, the inference API's bearer tokens /etc/litefleet/api-tokens "
                    "(0600, never overwritten), and create the service user and the API socket's group "
                    "(litefleet-api: its members may use the inference API). --root installs into an "
                    "image or a test directory instead of /.")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="install below DIR (an image root); default /")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    p.add_argument("--config-only", action="store_true", help="only write agent.toml (if missing)")
    p.add_argument("--user", default=install_mod.DEFAULT_USER, help="service user (default: %(default)s)")
    p.add_argument("--exec", dest="exec_path", metavar="PATH",
                   help="the litefleet-agent executable the unit starts (default: the running one)")
    p.add_argument("--device-id", help="device_id for a new agent.toml (default: the host name)")
    p.add_argument("--profile", help="device profile for a new agent.toml")
    p.add_argument("--no-tls-credential", action="store_true",
                   help="leave LoadCredential=device.key out of the unit (no broker / no client key)")
    p.add_argument("--enable", action="store_true",
                   help="also run systemctl daemon-reload and enable --now (live system, as root)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_install)


def _install(args: argparse.Namespace) -> int:
    plan = install_mod.plan(
        args.root, user=args.user, config_only=args.config_only,
        exec_argv=[str(Path(args.exec_path).absolute())] if args.exec_path else None,
        device_id=args.device_id, profile=args.profile, tls_credential=not args.no_tls_credential,
        enable=args.enable)
    if not args.dry_run:
        install_mod.apply(plan)
    if args.json:
        print_json({"root": str(plan.root), "dry_run": args.dry_run,
                    "steps": [s.to_dict() for s in plan.steps],
                    "next": [shlex.join(c) for c in plan.next_commands], "warnings": plan.warnings})
        return 0
    print("would do:" if args.dry_run else "done:")
    for step in plan.steps:
        print(f"  {step.describe()}")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.next_commands:
        print("then run:" if not args.dry_run else "then:")
        for command in plan.next_commands:
            print(f"  {shlex.join(command)}")
    return 0
