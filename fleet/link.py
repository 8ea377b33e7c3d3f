"""Host-side MQTT connections from command-line options, shared by ``server``, ``push``,
``rollback`` and ``device-config``.

Why one place: every host command must reach the broker the same way (mutual TLS with the
identity ``litefleet broker config`` issued), and fail with the same clear message when it
cannot, instead of each command growing its own half of the options.
"""

from __future__ import annotations

import argparse
import os
import uuid

from agent.mqtt import MqttError, MqttLink, TlsFiles, parse_url

DEFAULT_CONNECT_TIMEOUT_S = 15.0


def add_broker_options(parser: argparse.ArgumentParser, *, client_id: str = "") -> None:
    """Add ``--broker``, ``--ca``, ``--cert``, ``--key``, ``--client-id`` and ``--connect-timeout``
    to ``parser``. ``client_id`` is the default id (empty: a random one per run)."""
    group = parser.add_argument_group("broker connection")
    group.add_argument("--broker", required=True, metavar="URL",
                       help="mqtts://host:8883 (mutual TLS) or mqtt://host:1883 (no TLS: tests only)")
    group.add_argument("--ca", metavar="PEM", help="the broker CA certificate (DIR/ca.crt of `litefleet broker config`)")
    group.add_argument("--cert", metavar="PEM", help="this client's certificate (e.g. DIR/clients/operator.crt)")
    group.add_argument("--key", metavar="PEM", help="this client's private key (e.g. DIR/clients/operator.key)")
    group.add_argument("--client-id", default=client_id, metavar="ID",
                       help="MQTT client id (default: " + (client_id or "a fresh random one per run") + ")")
    group.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S",
                       help="give up when the broker cannot be reached for this long (default: %(default)s)")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the options name; an mqtts:// URL needs all three, mqtt:// none."""
    _host, _port, tls = parse_url(args.broker)
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if not tls:
        named = [k for k, v in given.items() if v]
        if named:
            raise MqttError(f"{', '.join(named)} given but --broker {args.broker} is not mqtts://")
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise MqttError(f"--broker {args.broker} uses TLS: also give {', '.join(missing)} "
                        f"(files written by `litefleet broker config`)")
    for flag, path in given.items():
        if not os.path.isfile(path):
            raise MqttError(f"{flag} {path}: file not found")
    return TlsFiles(args.ca, args.cert, args.key)


def link_from_args(args: argparse.Namespace, *, prefix: str, persistent: bool = False, **kwargs) -> MqttLink:
    """An unstarted :class:`MqttLink` for the options. ``persistent``: keep the broker session
    (a service); otherwise a clean session that the broker forgets on disconnect (a one-shot command)."""
    client_id = args.client_id or f"{prefix}-{uuid.uuid4().hex[:10]}"
    session = {} if persistent else {"clean_start": True, "session_expiry_s": 0}
    return MqttLink(args.broker, client_id, tls=tls_from_args(args), backoff=(0.2, 5.0), **session, **kwargs)


def open_link(args: argparse.Namespace, *, prefix: str, **kwargs) -> MqttLink:
    """A started, connected link, or :class:`MqttError` saying why the broker could not be reached."""
    link = link_from_args(args, prefix=prefix, **kwargs)
    link.start()
    if not link.wait_connected(args.connect_timeout):
        reason = link.last_error or "no answer"
        link.stop(timeout=2)
        raise MqttError(f"cannot connect to {args.broker} within {args.connect_timeout:g}s: {reason}")
    return link


__all__ = ["add_broker_options", "tls_from_args", "link_from_args", "open_link"]
