"""``litefleet server`` (the fleet server: repository service for now) and ``litefleet repo add``."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from agent.clikit import print_json
from agent.protocol import keys
from agent.protocol.errors import KeyFileError, LitefleetError
from fleet.link import add_broker_options, link_from_args
from fleet.repository import BlobStore
from fleet.server import FleetServer


def load_trust(paths: list[Path]) -> list[keys.PublicKey]:
    """Trusted public keys from files or directories; at least one must be a release key."""
    trusted: list[keys.PublicKey] = []
    for path in paths:
        if path.is_dir():
            trusted.extend(keys.load_trusted_dir(path))
        else:
            key = keys.load_public(path)
            trusted.append(key if key.role else keys.PublicKey("release", key.key, key.path))
    if not any(k.role == "release" for k in trusted):
        raise KeyFileError(f"--trust {' '.join(map(str, paths))}: no release key (release*.pub) among them; "
                           f"bundles could never be verified")
    return trusted


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "server", help="run the fleet server (repository service answering devices' chunk requests)",
        description="Serve the bundles in --repo to the fleet's devices over MQTT until SIGTERM or Ctrl-C "
                    "(exit 0). Connect with the server identity of `litefleet broker config` "
                    "(DIR/clients/litefleet-server.crt). Add bundles with `litefleet repo add` or `litefleet push "
                    "--repo`, also while the server runs.")
    add_broker_options(s, client_id="litefleet-server")
    s.add_argument("--fleet", required=True, help="fleet name (topic prefix lf/v1/FLEET/)")
    s.add_argument("--repo", required=True, type=Path, metavar="DIR", help="the repository directory")
    s.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY|DIR",
                   help="trusted release public key(s) or directories of them")
    s.add_argument("--stats-interval", type=float, default=60.0, metavar="S",
                   help="log a stats line this often (default: %(default)s)")
    s.set_defaults(func=_server)

    r = subparsers.add_parser("repo", help="manage the bundle repository")
    sub = r.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="verify bundles and add them to the repository",
                         description="Verify each bundle (signature by a trusted release key, model hashes) and "
                                     "store it under DIR/blobs/<model sha256>/. A refused bundle is not stored; "
                                     "the exit status is 1 if any was refused.")
    add.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE")
    add.add_argument("--repo", required=True, type=Path, metavar="DIR")
    add.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY|DIR")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_repo_add)


def _server(args: argparse.Namespace) -> int:
    store = BlobStore(args.repo, load_trust(args.trust))
    link = link_from_args(args, prefix="litefleet-server", persistent=True)
    server = FleetServer(link, store, args.fleet, stats_interval_s=args.stats_interval)
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
            manifest = store.add_bundle(path)
        except (LitefleetError, OSError) as exc:  # a bad file must not stop the others
            results.append({"bundle": str(path), "ok": False, "error": str(exc)})
            continue
        results.append({"bundle": str(path), "ok": True, "name": manifest.name, "version": manifest.version,
                        "profile": manifest.profile, "blob": manifest.sha256, "chunks": len(manifest.chunks)})
    if args.json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                print(f"added {r['name']} v{r['version']} ({r['profile']}) as blob {r['blob']} ({r['chunks']} chunks)")
            else:
                print(f"refused {r['bundle']}: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1
