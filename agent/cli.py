"""``litefleet-agent``: the on-device command (run the daemon, install, inspect, predict)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent import __version__
from agent.clikit import run

COMMAND_MODULES: tuple[str, ...] = (
    "agent.commands.run",
    "agent.commands.status",
    "agent.commands.predict",
    "agent.commands.install",
    "agent.commands.install_bundle",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run("litefleet-agent", "The litefleet device agent.", COMMAND_MODULES, __version__, argv)


if __name__ == "__main__":
    sys.exit(main())
