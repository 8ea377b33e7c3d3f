"""``litefleet server`` (the fleet server: repository service for now) and ``litefleet repo add``."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from agent.clikit import print_json
from agent.protocol import keys
from agent.protocol.errors import KeyFileError, LitefleetError
from fleet.ingest_link import IngestLink
from fleet.link import add_broker_options, link_from_args, tls_from_args
from fleet.repository import BlobStore


def load_trust(paths: list[Path]) -> list[keys.PublicKey]:
    """Trusted public keys from files or directories; at least one must be a release key."""
    trusted = keys.load_trust_paths(paths)
    if not any(k.role == "release" for k in trusted):
        raise KeyFileError(f"--trust {' '.join(map(str, paths))}: no release key (release*.pub) among them; "
                           f"bundles could never be verified")
    return trusted


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "server", help="run the fleet server: repository, ingest, HTTP API and dashboard, alerts, rollouts",
        description="Serve bundles to the fleet's devices, ingest their status, telemetry and events into the "
                    "store, and serve the HTTP API, dashboard and /metrics, until SIGTERM or Ctrl-C (exit 0). "
                    "Connect with the server identity of `litefleet broker config` "
                    "(DIR/clients/litefleet-server.crt). Several servers may share one PostgreSQL and split the "
                    "telemetry through an MQTT shared subscription (--share-group).")
    add_broker_options(s, client_id="litefleet-server")
    s.add_argument("--fleet", required=True, help="fleet name (topic prefix lf/v1/FLEET/)")
    s.add_argument("--data", type=Path, default=default_data_dir(), metavar="DIR",
                   help="server data: repository, SQLite store, API token (default: %(default)s)")
    s.add_argument("--repo", type=Path, metavar="DIR", help="the repository directory (default: DATA/repo)")
    s.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY|DIR",
                   help="trusted release public key(s) or directories of them")
    s.add_argument("--db", metavar="URL", help="postgresql://... or a SQLite file (default: DATA/fleet.db)")
    s.add_argument("--repository-only", action="store_true",
                   help="serve bundles only: no store, ingest, API, alerts or rollouts")
    s.add_argument("--http-host", default="127.0.0.1", help="HTTP API address (default: %(default)s)")
    s.add_argument("--http-port", type=int, default=8600, help="HTTP API port; 0 = any free port, -1 = no HTTP "
                                                                "(default: %(default)s)")
    s.add_argument("--metrics-token", action="store_true", help="require the API token on /metrics too")
    s.add_argument("--share-group", default="litefleet", metavar="NAME",
                   help="MQTT shared-subscription group for ingest; servers in one group split the stream "
                        "(default: %(default)s; '' = every server gets every message)")
    s.add_argument("--ingest-protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT version of the ingest connection: 5 (default) is litefleet's own receive path, "
                        "bounded by Receive Maximum while the database is away; 3.1.1 uses paho, for brokers "
                        "without MQTT 5 (amqtt), and is about half as fast")
    s.add_argument("--operator-key", type=Path, metavar="KEY", help="operator key that signs rollout commands")
    s.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding the key's passphrase")
    s.add_argument("--raw-retention", type=float, default=86400.0, metavar="S",
                   help="seconds of raw telemetry kept before it is rolled up per minute (default: %(default)s)")
    s.add_argument("--minute-retention", type=float, default=30 * 86400.0, metavar="S",
                   help="seconds of per-minute rollups kept before they are rolled up per hour (default: %(default)s)")
    s.add_argument("--drift-threshold", type=_drift_threshold, default=0.2, metavar="PSI",
                   help="flag devices whose data drift score (population stability index, docs/quality.md) is "
                        "over this, in `fleet status`, the dashboard, /metrics and alerts (default: %(default)s)")
    s.add_argument("--stats-interval", type=float, default=60.0, metavar="S",
                   help="log a stats line this often (default: %(default)s)")
    s.set_defaults(func=_server)

    r = subparsers.add_parser("repo", help="manage the bundle repository")
    sub = r.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="verify bundles and add them to the repository",
                         description="Verify each bundle (signature by a trusted release key, model hashes) and "
                                     "store it under DIR/blobs/<blob id>/. A refused bundle is not stored; "
                                     "the exit status is 1 if any was refused.")
    add.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE")
    add.add_argument("--repo", required=True, type=Path, metavar="DIR")
    add.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY|DIR")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_repo_add)


def _drift_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.2, got {text!r}") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be a positive PSI value such as 0.2 (0.1-0.25 is a moderate "
                                         f"shift), got {value:g}")
    return value


def default_data_dir() -> Path:
    """$LITEFLEET_DATA_DIR, else ~/.local/share/litefleet (where `litefleet fleet` looks for the token)."""
    env = os.environ.get("LITEFLEET_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "litefleet"


def _server(args: argparse.Namespace) -> int:
    from fleet.server import FleetServer, ServerOptions
    data_dir: Path = args.data
    data_dir.mkdir(parents=True, exist_ok=True)
    blob_store = BlobStore(args.repo or data_dir / "repo", load_trust(args.trust))
    operator_key = None
    if args.operator_key:
        from litefleet.protocol_commands import read_passphrase
        operator_key = keys.load_private(args.operator_key, read_passphrase(args.passphrase_env, False))
    link = link_from_args(args, prefix="litefleet-server", persistent=True)
    store = ingest_link = None
    if not args.repository_only:
        from fleet.store import open_store
        store = open_store(args.db or str(data_dir / "fleet.db"))
        # its own client id: two connections with one id would take each other's session over and over
        ingest_id = f"{link.client_id}-ingest"
        if args.ingest_protocol == "5":
            ingest_link = IngestLink(args.broker, ingest_id, tls=tls_from_args(args), backoff=(0.2, 5.0))
        else:
            ingest_args = argparse.Namespace(**{**vars(args), "client_id": ingest_id})
            ingest_link = link_from_args(ingest_args, prefix="litefleet-server", persistent=True, manual_ack=True,
                                         protocol="3.1.1")
    options = ServerOptions(fleet=args.fleet, data_dir=data_dir, http_host=args.http_host,
                            http_port=args.http_port, metrics_token=args.metrics_token,
                            share_group=args.share_group or None, raw_retention_s=args.raw_retention,
                            minute_retention_s=args.minute_retention, stats_interval_s=args.stats_interval,
                            drift_threshold=args.drift_threshold)
    server = FleetServer(link, blob_store, options, store=store, ingest_link=ingest_link, operator_key=operator_key)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.run(stop)
    return 0


def _repo_add(args: argparse.Namespace) -> int:
    store = BlobStore(args.repo, load_trust(args.trust))
    results = []
    for path in args.bundles:
        try:
            stored = store.add_bundle(path)
        except (LitefleetError, OSError) as exc:  # a bad file must not stop the others
            results.append({"bundle": str(path), "ok": False, "error": str(exc)})
            continue
        manifest = stored.manifest
        results.append({"bundle": str(path), "ok": True, "name": manifest.name, "version": manifest.version,
                        "profile": manifest.profile, "blob": stored.blob_id, "model_sha256": manifest.sha256,
                        "chunks": len(manifest.chunks)})
    if args.json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                print(f"added {r['name']} v{r['version']} ({r['profile']}) as blob {r['blob']} ({r['chunks']} chunks)")
            else:
                print(f"refused {r['bundle']}: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1
