"""``litefleet broker config``: write a TLS + ACL mosquitto configuration for a fleet."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.clikit import print_json
from fleet import broker


def _device(text: str) -> broker.DeviceSpec:
    try:
        return broker.parse_device_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with K/M, e.g. 256K)") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("broker", help="configure the MQTT broker (TLS, certificates, ACL)")
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    c = sub.add_parser(
        "config", help="write a mosquitto config, a CA and client certificates",
        description="Write DIR/mosquitto.conf, DIR/acl, a CA, a server certificate and one client certificate "
                    "per device, for the operator and for the fleet server. Re-running on the same DIR reuses "
                    "its CA, keeps earlier devices (DIR/devices.toml) and issues only missing certificates. "
                    "Run the broker with: mosquitto -c DIR/mosquitto.conf")
    c.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    c.add_argument("--fleet", required=True, help="fleet name (the topic prefix lf/v1/FLEET/)")
    c.add_argument("--device", action="append", default=[], type=_device, metavar="ID[:GROUP,...][@PROFILE]",
                   help="a device, its groups and its profile (repeat for more)")
    c.add_argument("--devices-file", type=Path, metavar="TOML",
                   help='[[device]] tables: id = "...", groups = [...], profile = "..."')
    c.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or address devices use to reach the broker (server certificate SAN; repeat); "
                        "localhost and 127.0.0.1 are always included")
    c.add_argument("--port", type=int, default=broker.DEFAULT_PORT)
    c.add_argument("--bind", default="", metavar="ADDRESS", help="listen on this address only (default: all)")
    c.add_argument("--chunk-size", type=_size, default=broker.DEFAULT_CHUNK_SIZE,
                   help="model chunk size in bytes (the packet limit is this plus 64 KiB)")
    c.add_argument("--operator", default=broker.DEFAULT_OPERATOR, help="CN of the operator identity")
    c.add_argument("--server", default=broker.DEFAULT_SERVER, help="CN of the fleet server identity")
    c.add_argument("--max-inflight", type=int, default=broker.DEFAULT_MAX_INFLIGHT,
                   help="outgoing unacknowledged QoS 1 messages per client")
    c.add_argument("--max-queued-bytes", type=_size, default=broker.DEFAULT_MAX_QUEUED_BYTES,
                   help="per-client queue cap in bytes (0: unlimited); there is no message-count cap")
    c.add_argument("--run-as", default="", metavar="USER",
                   help="the user mosquitto switches to when started as root (default: mosquitto's own, "
                        "'mosquitto', which must then be able to read server.key and write DIR/data)")
    c.add_argument("--force", action="store_true",
                   help="make a NEW CA and re-issue every certificate (every device needs its new one)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    try:
        settings = broker.BrokerSettings(
            fleet=args.fleet, port=args.port, bind_address=args.bind, hosts=tuple(args.host),
            chunk_size=args.chunk_size, operator=args.operator, server=args.server,
            max_inflight_messages=args.max_inflight, max_queued_bytes=args.max_queued_bytes, run_as=args.run_as)
    except ValueError as exc:
        raise broker.BrokerConfigError(str(exc)) from None
    devices = list(args.device)
    if args.devices_file:
        devices += broker.load_devices_file(args.devices_file)
    result = broker.generate(args.output, settings, devices, force=args.force)
    layout = result.layout
    if args.json:
        print_json({"dir": str(layout.root), "conf": str(layout.conf), "acl": str(layout.acl),
                    "ca_reused": result.ca_reused, "issued": result.issued, "kept": result.kept,
                    "devices": [d.id for d in result.devices]})
        return 0
    print(f"broker config for fleet {settings.fleet!r} in {layout.root}")
    print(f"  CA: {layout.ca_cert} ({'reused' if result.ca_reused else 'new'}; keep {layout.ca_key.name} private)")
    print(f"  issued: {', '.join(result.issued) or 'nothing new'}")
    if result.kept:
        print(f"  kept:   {', '.join(result.kept)}")
    print(f"  devices in the ACL: {len(result.devices)}")
    print(f"  run: mosquitto -c {layout.conf}")
    return 0
