"""Benchmark: no silent loss. A slow QoS 1 receiver under mosquitto's defaults vs the project's configuration.

For each broker configuration x MQTT protocol x receiver, a bare paho publisher sends N
numbered QoS 1 messages as fast as it can, and a receiver whose handler is deliberately slow
(it sleeps per message) counts the distinct numbers that arrive. The broker acknowledges every
message to the publisher (the 'acked' column), so any message missing at the receiver vanished
without an error anywhere.

* configurations: mosquitto's defaults (a config with just a listener: 20 in flight, 1,000
  queued per client) and the project's generated limits (``fleet.broker.render_mosquitto_conf``:
  ``max_queued_messages 0``, ``max_queued_bytes``, ``max_inflight_messages 100``; plain TCP);
* receivers: raw paho (the slow handler is paho's ``on_message``, on the network thread, as a
  naive client would write it), our ``MqttLink`` (handlers run on a worker thread, so the
  network thread keeps acknowledging and the broker never has to queue), and our ``BlobLink``
  (the connection a device pulls models on: its handler runs on its only thread, so a slow one
  stops its reads and the broker must queue, like raw paho);
* protocols: MQTT 3.1.1 and MQTT 5 (paho's default Receive Maximum for raw; 65535 for ours).

The receiver is done when every number arrived, or when nothing arrived for a quiet period
after the publisher finished (the broker had nothing more to send).

    .venv/bin/python -m bench.mqtt_noloss [--quick] [--json] [--messages 20000] [--slow-ms 0.5]
"""

from __future__ import annotations

import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as paho

from bench.common import Report, fmt_ratio, log, parse_args
from bench.support import default_config, project_config, project_tuning, start_broker

from agent.blob_link import BlobLink
from agent.mqtt import MqttLink
from agent.protocol.manifest import DEFAULT_CHUNK_SIZE

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
PAYLOAD = 64  # bytes per message: a sequence number and padding, like a small telemetry record


class Receiver:
    """Counts distinct sequence numbers; ``slow_s`` of sleep per message in the handler."""

    def __init__(self, slow_s: float) -> None:
        self.slow_s = slow_s
        self.seen: set[int] = set()
        self.duplicates = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, payload: bytes) -> None:
        time.sleep(self.slow_s)  # the deliberately slow application
        (number,) = struct.unpack_from(">I", payload)
        with self.lock:
            if number in self.seen:
                self.duplicates += 1
            self.seen.add(number)
            self.last = time.monotonic()


class RawReceiver(Receiver):
    def __init__(self, url: str, topic: str, protocol: str, slow_s: float) -> None:
        super().__init__(slow_s)
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-slow-{protocol}",
                                  protocol=PROTOCOLS[protocol])
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, msg: self.take(msg.payload)
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        if not subscribed.wait(15):
            raise RuntimeError(f"raw receiver got no SUBACK from {url}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class LinkReceiver(Receiver):
    def __init__(self, url: str, topic: str, protocol: str, slow_s: float) -> None:
        super().__init__(slow_s)
        self.link = MqttLink(url, f"link-slow-{protocol.replace('.', '')}", protocol=protocol, clean_start=True,
                             backoff=(0.1, 1.0))
        token = self.link.subscribe(topic, lambda message: self.take(message.payload), qos=1)
        self.link.start()
        if not (self.link.wait_connected(15) and token.wait(15)):
            raise RuntimeError(f"MqttLink receiver did not connect and subscribe to {url}: {self.link.last_error}")

    def close(self) -> None:
        self.link.stop()


class BlobLinkReceiver(Receiver):
    def __init__(self, url: str, topic: str, protocol: str, slow_s: float) -> None:
        super().__init__(slow_s)
        self.link = BlobLink(url, f"blob-slow-{protocol.replace('.', '')}", protocol=protocol, backoff=(0.1, 1.0))
        token = self.link.subscribe(topic, lambda message: self.take(message.payload), qos=1)
        if not token.wait(15):
            raise RuntimeError(f"BlobLink receiver did not connect and subscribe to {url}: {self.link.last_error}")

    def close(self) -> None:
        self.link.stop()


RECEIVERS = {"raw paho": RawReceiver, "MqttLink": LinkReceiver, "BlobLink": BlobLinkReceiver}


def publish_all(url: str, topic: str, protocol: str, count: int) -> tuple[int, float]:
    """A bare paho publisher: ``count`` QoS 1 messages as fast as paho takes them; (acked, seconds)."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{protocol}", protocol=PROTOCOLS[protocol])
    acked = 0
    done = threading.Event()

    def on_publish(*_args) -> None:
        nonlocal acked
        acked += 1
        if acked >= count:
            done.set()
    client.on_publish = on_publish
    client.connect(host, int(port))
    client.loop_start()
    padding = bytes(PAYLOAD - 4)
    start = time.perf_counter()
    for number in range(count):
        client.publish(topic, struct.pack(">I", number) + padding, qos=1)
    done.wait(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return acked, elapsed


def run_cell(url: str, topic: str, protocol: str, receiver_kind: str, count: int, slow_s: float,
             quiet_s: float) -> dict:
    receiver = RECEIVERS[receiver_kind](url, topic, protocol, slow_s)
    try:
        acked, publish_s = publish_all(url, topic, protocol, count)
        start = time.monotonic()
        deadline = start + count * slow_s * 3 + 60
        while time.monotonic() < deadline:  # poll with a deadline: all in, or quiet for quiet_s
            with receiver.lock:
                got, last = len(receiver.seen), receiver.last
            if got >= count or time.monotonic() - max(last, start) >= quiet_s:
                break
            time.sleep(0.05)  # polling interval of a deadline loop
        with receiver.lock:
            received, duplicates = len(receiver.seen), receiver.duplicates
    finally:
        receiver.close()
    return {"sent": count, "acked": acked, "received": received, "lost": count - received,
            "duplicates": duplicates, "publish_s": publish_s}


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument("--messages", type=int, default=None, help="messages per cell (default 20000; --quick 1500)")
        parser.add_argument("--slow-ms", type=float, default=0.5, help="handler sleep per message (default 0.5 ms)")
    args = parse_args("A slow QoS 1 receiver: mosquitto defaults vs the project's broker configuration", argv, extra)
    count = args.messages or (1500 if args.quick else 20000)
    slow_s = args.slow_ms / 1000
    quiet_s = 1.0 if args.quick else 3.0
    configs = {"mosquitto defaults": default_config, "litefleet generated": project_config(DEFAULT_CHUNK_SIZE)}

    report = Report(f"A slow QoS 1 receiver ({args.slow_ms:g} ms per message): {count} messages per cell",
                    ["broker config", "protocol", "receiver", "sent", "acked by broker", "received", "lost",
                     "received vs sent", "duplicates"])
    cells: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-noloss-") as tmp:
        for config_name, config in configs.items():
            broker = start_broker(config, Path(tmp) / config_name.replace(" ", "-"))
            try:
                for protocol in ("3.1.1", "5"):
                    for receiver_kind in RECEIVERS:
                        topic = f"bench/noloss/{protocol}/{receiver_kind.replace(' ', '-')}"
                        cell = run_cell(broker.url, topic, protocol, receiver_kind, count, slow_s, quiet_s)
                        cell.update(config=config_name, protocol=protocol, receiver=receiver_kind)
                        cells.append(cell)
                        log(f"  {config_name:20s} MQTT {protocol:5s} {receiver_kind:8s}: sent {cell['sent']}, "
                            f"acked {cell['acked']}, received {cell['received']}, lost {cell['lost']}")
                        report.add(config_name, protocol, receiver_kind, cell["sent"], cell["acked"], cell["received"],
                                   cell["lost"], fmt_ratio(cell["received"] / cell["sent"]), cell["duplicates"])
            finally:
                broker.close()

    def cell(config: str, protocol: str, receiver: str) -> dict:
        return next(c for c in cells if (c["config"], c["protocol"], c["receiver"]) == (config, protocol, receiver))

    silent = cell("mosquitto defaults", "3.1.1", "raw paho")
    report.notes += [
        "acked by broker = PUBACKs the publisher got: the broker accepted every message, so 'lost' were dropped "
        "later, silently (no error to the publisher or the receiver)",
        f"litefleet generated limits: {'; '.join(project_tuning(DEFAULT_CHUNK_SIZE))} (plain TCP listener here; "
        "the generated file adds TLS, client certificates and the ACL)",
        "raw paho: the slow handler is on_message on paho's network thread; MqttLink: the handler runs on the "
        "subscription's worker thread (agent/mqtt.py); BlobLink: on the link's only thread (agent/blob_link.py)",
    ]
    report.verdict("mosquitto defaults + slow raw MQTT 3.1.1 receiver loses messages silently (the problem exists)",
                   silent["lost"] > 0 and silent["acked"] == silent["sent"],
                   f"{silent['received']} of {silent['sent']} arrived, all {silent['acked']} acked by the broker")
    for protocol in ("3.1.1", "5"):
        for receiver_kind in ("MqttLink", "BlobLink"):
            ours = cell("litefleet generated", protocol, receiver_kind)
            report.verdict(f"litefleet config + {receiver_kind}, MQTT {protocol}: nothing lost", ours["lost"] == 0,
                           f"{ours['received']} of {ours['sent']} arrived")
    report.data.update({"cells": cells, "slow_ms": args.slow_ms})
    report.print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
