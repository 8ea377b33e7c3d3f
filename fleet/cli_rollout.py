"""``litefleet rollout start|status|pause|resume|abort|list``: staged rollouts through the server's API.

``start`` runs on the server's host: it verifies each bundle, adds it to the server's repository
(``--repo``), and asks the server to create the rollout; the server's rollout runner does the rest
(stages, soak, health, rollback) and survives restarts. The other actions only talk to the API.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.clikit import print_json
from agent.protocol import bundle as bundle_mod
from fleet import push
from fleet.cli_fleet import ApiClient, AuthError, FleetApiError, _add_server_options, _error_message, client_from_args
from fleet.cli_server import load_trust
from fleet.repository import BlobStore
from fleet.rollout import RolloutError, parse_failure_bound, parse_health, parse_stages

FINAL = ("completed", "aborted")


def _post(client: ApiClient, path: str, doc: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{client.server}{path}", data=json.dumps(doc).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {client.token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=client.timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = _error_message(exc)
        if exc.code == 401:
            raise AuthError(f"the fleet server at {client.server} refused the token: {message}") from None
        raise FleetApiError(f"{path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(getattr(exc, "reason", None), "strerror", None) or str(getattr(exc, "reason", exc))
        raise FleetApiError(f"cannot reach the fleet server at {client.server}: {reason} (is `litefleet server` "
                            f"running? pass --server URL)") from None


def _checked(parse: Any, flag: str) -> Any:
    def check(text: str) -> str:
        try:
            parse(text)
        except (RolloutError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    check.__name__ = flag
    return check


def _duration(text: str) -> float:
    try:
        return push.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser("rollout", help="staged rollouts that stop and roll back on a breach")
    sub = r.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "start", help="add bundles to the repository and start a staged rollout",
        description="Verify BUNDLE(s) (one per device profile, same model), add them to the server's repository, "
                    "and create a rollout: the server deploys stage by stage, watches install events and "
                    "post-install telemetry against each device's pre-rollout baseline, soaks, then widens. On a "
                    "breach it pauses or aborts (--on-breach) and rolls back the devices it updated.")
    s.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE")
    s.add_argument("--target", required=True, type=_checked(push.parse_target, "target"),
                   metavar="device:ID|group:NAME|profile:NAME|all")
    s.add_argument("--stages", default="1,10%,50%,100%", type=_checked(parse_stages, "stages"),
                   help="cumulative device counts or percentages, ending at 100%% (default: %(default)s)")
    s.add_argument("--soak", type=_duration, default=600.0, metavar="DURATION",
                   help="how long each stage runs healthy before the next (default: 10m)")
    s.add_argument("--max-failures", default="5%", type=_checked(parse_failure_bound, "max-failures"),
                   help="failed devices of a stage tolerated: 5%% or a count (default: %(default)s)")
    s.add_argument("--health", default="p95_latency_ms<=1.2*baseline,error_rate<1%",
                   type=_checked(parse_health, "health"),
                   help="health rule over the stage's updated devices (default: %(default)s)")
    s.add_argument("--on-breach", choices=("pause", "abort"), default="abort")
    s.add_argument("--install-timeout", type=_duration, default=900.0, metavar="DURATION",
                   help="a device that has not installed after this long counts as failed (default: 15m)")
    s.add_argument("--stale-after", type=_duration, default=120.0, metavar="DURATION",
                   help="an updated device silent this long stopped reporting (default: 2m)")
    s.add_argument("--min-samples", type=int, default=3, metavar="N",
                   help="telemetry samples of a stage before the health rule is judged (default: %(default)s)")
    s.add_argument("--baseline-window", type=_duration, default=600.0, metavar="DURATION",
                   help="telemetry before a device's update that forms its baseline (default: 10m)")
    s.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                   help="validity of each signed command (default: 1h)")
    s.add_argument("--id", metavar="ID", help="the rollout's id (default: generated)")
    s.add_argument("--repo", required=True, type=Path, metavar="DIR", help="the server's repository directory")
    s.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY|DIR",
                   help="trusted release key(s) to verify the bundles")
    s.add_argument("--json", action="store_true")
    _add_server_options(s)
    s.set_defaults(func=_start)

    st = sub.add_parser("status", help="one rollout: state, stage, reason, each device")
    st.add_argument("id", metavar="ID")
    st.add_argument("--watch", action="store_true", help="refresh until the rollout ends")
    st.add_argument("--interval", type=float, default=2.0, metavar="S")
    st.add_argument("--json", action="store_true")
    _add_server_options(st)
    st.set_defaults(func=_status)

    for action, text in (("pause", "stop widening (devices keep their model)"),
                         ("resume", "continue a paused rollout at its current stage"),
                         ("abort", "stop and roll back every device the rollout updated")):
        p = sub.add_parser(action, help=text)
        p.add_argument("id", metavar="ID")
        p.add_argument("--reason", default="")
        p.add_argument("--json", action="store_true")
        _add_server_options(p)
        p.set_defaults(func=_act, action=action)

    ls = sub.add_parser("list", help="every rollout, newest first")
    ls.add_argument("--json", action="store_true")
    _add_server_options(ls)
    ls.set_defaults(func=_list)


def bundles_for(paths: list[Path], repo: Path, trust: list[Path]) -> dict[str, dict[str, Any]]:
    """Verify each bundle, add it to the repository; {profile: deploy args}. One bundle per profile."""
    trusted = load_trust(trust)
    store = BlobStore(repo, trusted)
    out: dict[str, dict[str, Any]] = {}
    names = set()
    for path in paths:
        parts = bundle_mod.read_bundle(path)
        manifest = bundle_mod.verify(parts, trusted).manifest
        if manifest.profile in out:
            raise RolloutError(f"{path}: a second bundle for profile {manifest.profile!r}; give one per profile")
        names.add(manifest.name)
        store.add_bundle(path)
        out[manifest.profile] = push.deploy_args(manifest, parts.manifest_bytes)
    if len(names) > 1:
        raise RolloutError(f"the bundles are of different models ({', '.join(sorted(names))}); one rollout, one model")
    return out


def _start(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    doc = {"bundles": bundles_for(args.bundles, args.repo, args.trust), "target": args.target,
           "stages": args.stages, "soak_s": args.soak, "max_failures": args.max_failures, "health": args.health,
           "on_breach": args.on_breach, "install_timeout_s": args.install_timeout,
           "stale_after_s": args.stale_after, "min_samples": args.min_samples,
           "baseline_window_s": args.baseline_window, "command_ttl_s": args.ttl}
    if args.id:
        doc["id"] = args.id
    rollout = _post(client, "/api/v1/rollouts", doc)["rollout"]
    if args.json:
        print_json(rollout)
    else:
        print(f"rollout {rollout['id']} created: {rollout['reason']}")
        print(f"follow it with: litefleet rollout status {rollout['id']} --watch")
    return 0


def render(rollout: dict[str, Any], now: float | None = None) -> str:
    """The status text of one rollout (pure)."""
    now = time.time() if now is None else now
    versions = ", ".join(f"{p}: v{v}" for p, v in sorted(rollout.get("versions", {}).items()))
    lines = [f"rollout {rollout['id']}: {rollout['state'].upper()}  model {rollout.get('model')} ({versions})  "
             f"target {rollout.get('target')}",
             f"stage {rollout.get('stage')}/{rollout.get('stages')} (up to {rollout.get('stage_target')} of "
             f"{rollout.get('target_devices')} devices)",
             f"reason: {rollout.get('reason')}"]
    if rollout.get("breach"):
        lines.append(f"breach: {rollout['breach']}")
    devices = rollout.get("devices") or []
    if devices:
        lines.append(f"{'device':<20} {'profile':<12} {'stage':>5}  {'state':<16} detail")
        for d in devices:
            stage = "" if d.get("stage") is None else str(d["stage"] + 1)
            lines.append(f"{d['device_id']:<20} {d['profile']:<12} {stage:>5}  {d['state']:<16} "
                         f"{(d.get('reason') or '')[:90]}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    while True:
        rollout = client.get(f"/api/v1/rollouts/{args.id}")["rollout"]
        if args.json:
            print_json(rollout)
        else:
            print(render(rollout), flush=True)
        if not args.watch or rollout["state"] in FINAL + ("paused",):
            return 0 if rollout["state"] != "aborted" else 1
        time.sleep(args.interval)   # a refresh interval for a person watching, not synchronisation
        if not args.json:
            print()


def _act(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    rollout = _post(client, f"/api/v1/rollouts/{args.id}/{args.action}", {"reason": args.reason})["rollout"]
    if args.json:
        print_json(rollout)
    else:
        print(f"rollout {rollout['id']}: {rollout['state']}: {rollout['reason']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    rollouts = client.get("/api/v1/rollouts")["rollouts"]
    if args.json:
        print_json(rollouts)
        return 0
    if not rollouts:
        print("no rollouts")
    for r in rollouts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.get("devices_by_state", {}).items()))
        print(f"{r['id']:<28} {r['state']:<13} {r['model']:<12} {r['target']:<18} {counts}  {r['reason'][:80]}")
    return 0


__all__ = ["register", "render", "bundles_for"]
