"""``litefleet``: the operator's command on the host.

Each part registers its own subcommands; modules that need tensorflow import it only when
their command runs, so ``litefleet --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent import __version__
from agent.clikit import run

COMMAND_MODULES = (
    "litefleet.protocol_commands",  # keys, profiles, bundle
    "converter.cli",                # convert
    "converter.cli_distill",        # distill
    "litefleet.demo",               # demo
    "fleet.cli_broker",             # broker config
    "fleet.cli_server",             # server, repo add
    "fleet.cli_push",               # push, rollback, device-config
    "fleet.cli_fleet",              # fleet status, fleet device
    "fleet.cli_rollout",            # rollout start|status|pause|resume|abort|list
)


def main(argv: Sequence[str] | None = None) -> int:
    return run("litefleet", "Convert, sign, push and monitor TFLite models on a fleet of edge devices.",
               COMMAND_MODULES, __version__, argv)


if __name__ == "__main__":
    sys.exit(main())
