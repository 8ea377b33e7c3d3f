"""``litefleet-agent status``: what the agent on this device is doing, for a person or a script."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from agent.clikit import print_json
from agent.config import DEFAULT_CONFIG_PATH, load_config
from agent.daemon import STATUS_FILE
from agent.store import ModelStore

STALE_AFTER_S = 120


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show the active model, runtime, delegate and health")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="agent.toml (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def gather(config_path: Path) -> dict[str, Any]:
    config = load_config(config_path)
    snapshot: dict[str, Any] = {}
    path = config.state_dir / STATUS_FILE
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        snapshot = {}
    running = bool(snapshot.get("running")) and _alive(snapshot.get("pid"))
    age = time.time() - float(snapshot.get("updated_at", 0) or 0)
    return {
        "device_id": config.device_id, "fleet": config.fleet, "profile": config.profile,
        "daemon": ("running" if running and age < STALE_AFTER_S else
                   "not responding" if running else "not running"),
        "store": ModelStore(config.state_dir).status(),
        "snapshot": snapshot,
    }


def _status(args: argparse.Namespace) -> int:
    info = gather(args.config)
    if args.json:
        print_json(info)
        return 0
    snap = info["snapshot"]
    store = info["store"]
    active, previous = store.get("active"), store.get("previous")
    print(f"device {info['device_id']} (fleet {info['fleet']}, profile {info['profile']}): daemon {info['daemon']}")
    print(f"  active model:   {_model(active)}")
    print(f"  previous model: {_model(previous)}")
    engine = snap.get("engine") or {}
    if engine:
        nodes = (f", {engine['delegated_nodes']}/{engine['total_nodes']} nodes delegated"
                 if engine.get("total_nodes") else "")
        print(f"  runtime:        {engine.get('runtime')} {engine.get('runtime_version')}, "
              f"delegate {engine.get('delegate')}, {engine.get('threads')} threads{nodes}")
        for attempt in engine.get("attempts", []):
            if attempt.get("outcome") != "used":
                print(f"    skipped {attempt.get('kind')}: {attempt.get('reason')}")
    api = snap.get("api") or {}
    if api:
        print(f"  inference API:  {api.get('tcp') or 'TCP off'}; socket {api.get('unix_socket')}")
    health = snap.get("health")
    if health:
        print(f"  health watch:   {health.get('state')}: {health.get('reason')}")
    inference = ((snap.get("telemetry") or {}).get("inference") or {})
    if inference:
        latency = inference.get("latency_ms") or {}
        print(f"  last interval:  {inference.get('count', 0)} inferences, {inference.get('errors', 0)} errors, "
              f"p95 {latency.get('p95')} ms")
    spool = snap.get("spool") or {}
    if spool:
        print(f"  spool:          {spool.get('pending')} pending, {spool.get('dropped')} dropped")
    for event in (snap.get("recent_events") or [])[-5:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
        print(f"  {stamp} {event.get('kind')}: {event.get('reason')}")
    return 0


def _model(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "none"
    return f"{doc['name']} v{doc['version']} (sha256 {doc['sha256'][:12]})"
