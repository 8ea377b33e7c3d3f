"""Hand a bundle file to the running daemon, so it installs it and switches what it serves.

``litefleet-agent install-bundle`` run beside a live daemon must not change the store behind
the daemon's back (it would keep serving the old model). Instead it drops the file into
``<state_dir>/inbox/`` (written then renamed, so the daemon never sees half a file) and waits
for ``<id>.result.json``. The daemon takes one file per loop turn.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.protocol.keys import atomic_write

INBOX = "inbox"
SUFFIX = ".lfb"
RESULT_SUFFIX = ".result.json"


def inbox_dir(state_dir: Path) -> Path:
    return Path(state_dir) / INBOX


def daemon_running(state_dir: Path, status_file: str = "status.json") -> bool:
    """True when a live daemon owns this state directory."""
    try:
        status = json.loads((Path(state_dir) / status_file).read_text())
        if not status.get("running"):
            return False
        os.kill(int(status["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return False


def submit(state_dir: Path, bundle: Path, timeout_s: float = 600.0, poll_s: float = 0.1) -> dict[str, Any]:
    """Give ``bundle`` to the daemon and wait for its verdict (an InstallResult as a dict)."""
    directory = inbox_dir(state_dir)
    directory.mkdir(mode=0o750, exist_ok=True)
    ticket = uuid.uuid4().hex
    tmp = directory / f".{ticket}.tmp"
    try:
        shutil.copyfile(bundle, tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AgentError(f"cannot copy {bundle} into {directory}: {exc.strerror or exc}") from None
    os.replace(tmp, directory / f"{ticket}{SUFFIX}")
    result_path = directory / f"{ticket}{RESULT_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while not result_path.exists():
        if time.monotonic() > deadline:
            raise AgentError(f"the running agent did not answer within {timeout_s:g} s; "
                             f"the bundle waits in {directory}")
        time.sleep(poll_s)
    result = json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    return result


def take_one(state_dir: Path, install: Callable[[Path], dict[str, Any]]) -> bool:
    """Install the oldest waiting bundle, if any, and leave its result; True when one was taken."""
    directory = inbox_dir(state_dir)
    try:
        waiting = sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return False
    if not waiting:
        return False
    bundle = waiting[0]
    try:
        result = install(bundle)
    finally:
        bundle.unlink(missing_ok=True)
    atomic_write(directory / (bundle.name[:-len(SUFFIX)] + RESULT_SUFFIX),
                 json.dumps(result, default=str).encode(), mode=0o640)
    return True
