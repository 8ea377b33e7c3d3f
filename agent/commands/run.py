"""``litefleet-agent run``: the daemon systemd starts."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the agent daemon (what systemd starts)",
                              description="Serve the active model, install new ones, watch their health and "
                                          "report telemetry until stopped (SIGTERM or Ctrl-C). Exits with 78 "
                                          "(EX_CONFIG) on an invalid configuration.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="agent.toml (default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from agent.daemon import AgentDaemon  # heavy imports only when running
    config = load_config(args.config)
    daemon = AgentDaemon(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("litefleet.agent").info("starting agent %s (config %s)", config.device_id, config.path)
    daemon.run(stop)
    return 0
