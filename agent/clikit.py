"""Shared plumbing for the two console scripts: subcommand registration and error reporting."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agent.protocol.errors import LitefleetError

Handler = Callable[[argparse.Namespace], int | None]


def build_parser(prog: str, description: str, modules: Sequence[str], version: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def run(prog: str, description: str, modules: Sequence[str], version: str,
        argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn litefleet errors into one clear line and a non-zero exit."""
    parser = build_parser(prog, description, modules, version)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"{prog}: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler: Handler = args.func
    try:
        return int(handler(args) or 0)
    except LitefleetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))
