"""Benchmark: one device pulling a model over MQTT, against raw mosquitto throughput for the same bytes.

One local mosquitto (started here on a free port, with the limits of the project's generated
configuration: ``set_tcp_nodelay``, ``max_queued_messages 0``, ``max_inflight_messages 100``,
``max_packet_size`` fitting the largest chunk measured; plain TCP, no TLS) carries both:

* ours: the real ``RepositoryService`` in its own process answers a real ``Downloader`` in this
  one (own ``MqttLink``, state directory, real ``Installer`` + ``ModelStore`` so the head's
  signature, profile and capacity are checked; every chunk sha256-checked and written to
  ``model.part``, which ``fetch()`` returns mapped, not copied; the whole model's sha256 is the
  installer's check). Fetch only: the random bytes are never installed. Timed from ``fetch()`` to its return, head request included. Each run pulls a fresh
  signed random model, so what the repository remembers of one run never serves the next; each
  run is thus a new stream, whose first chunks the repository holds ``start_s`` for other
  devices (``--start-s`` changes it; 0 turns it off).
* raw: a bare paho publisher process pushes the same number of bytes in messages of the same
  chunk size at QoS 1 (paho defaults: 20 in flight) to a bare paho subscriber here that only
  counts: no protocol, no hashing, no disk. Timed from the go to the last message received.

Both use MQTT 5 (our link's choice with mosquitto 2). Every window x chunk size; runs of ours
and raw are interleaved so both see the same machine. ``max_inflight_bytes`` is lifted to
window x chunk so the requested window is the window used (a device's default of 4 MiB in
flight caps 1 MiB chunks, the default size, at 4 and 256 KiB chunks at 16: the "defaults" verdict
uses the former).

    .venv/bin/python -m bench.mqtt_pull [--quick] [--json] [--size-mb 15] [--repeats 3] [--start-s S]
                                        [--chunk-kib K ...] [--windows W ...] [--nodelay]
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as paho

from agent.protocol.manifest import DEFAULT_CHUNK_SIZE
from agent.transfer import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_WINDOW, max_window
from bench.common import Report, fmt_ratio, log, parse_args, ratio
from bench.support import (KiB, MB, MiB, BenchKeys, add_random_blob, enable_nodelay, expect, finish,
                           make_device, median, project_config, project_tuning, raw_publisher_main, remove_blob,
                           repository_main, spawn, start_broker)

TARGET = 0.5            # ours >= 50% of raw
CHUNKS = (64 * KiB, 256 * KiB, 1 * MiB)
WINDOWS = (1, 2, 4, 8, 16)
QUICK_CHUNKS = (64 * KiB, 256 * KiB)
QUICK_WINDOWS = (1, 4)
NEAR_BEST = 0.9         # the recommendation: the least bytes in flight within 90% of the best throughput


class RawSubscriber:
    """A bare paho subscriber that counts messages on one topic (the raw baseline's receiving end)."""

    def __init__(self, url: str, topic: str) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.topic = topic
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="raw-sub", protocol=paho.MQTTv5)
        self.count = 0
        self.bytes = 0
        self.expected = 0
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        if not self.subscribed.wait(15):
            raise RuntimeError(f"raw subscriber got no SUBACK from {url}")

    def _message(self, client, userdata, msg) -> None:
        self.count += 1
        self.bytes += len(msg.payload)
        if self.count >= self.expected:
            self.done.set()

    def expect(self, count: int) -> None:
        self.count = 0
        self.bytes = 0
        self.expected = count
        self.done.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def near_best(rows: dict[tuple[int, int], float]) -> tuple[int, int]:
    """(chunk, window): the fewest bytes in flight whose throughput is within NEAR_BEST of the best."""
    best = max(rows.values())
    near = [(chunk * window, -mbps, chunk, window) for (chunk, window), mbps in rows.items() if mbps >= NEAR_BEST * best]
    _, _, chunk, window = min(near)
    return chunk, window


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument("--size-mb", type=float, default=None, help="model size in MB (default 15; --quick 2)")
        parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; --quick 1)")
        parser.add_argument("--chunk-kib", type=int, nargs="+", help="chunk sizes in KiB (default 64 256 1024)")
        parser.add_argument("--windows", type=int, nargs="+", help="windows (default 1 2 4 8 16)")
        parser.add_argument("--nodelay", action="store_true",
                            help="what-if: the raw paho clients set TCP_NODELAY too, as ours do (see bench/support.py)")
        parser.add_argument("--start-s", type=float, default=None,
                            help="what-if: how long the repository holds a new stream's first chunks for other "
                                 "devices (default: the repository's own; 0 turns it off)")
    args = parse_args("One device pulling a model over MQTT vs raw mosquitto throughput", argv, extra)
    size = int((args.size_mb or (2 if args.quick else 15)) * MB)
    repeats = args.repeats or (1 if args.quick else 3)
    chunks = tuple(k * KiB for k in args.chunk_kib) if args.chunk_kib else QUICK_CHUNKS if args.quick else CHUNKS
    windows = tuple(args.windows) if args.windows else QUICK_WINDOWS if args.quick else WINDOWS

    ours: dict[tuple[int, int], list[float]] = {(c, w): [] for c in chunks for w in windows}
    raw: dict[int, list[float]] = {c: [] for c in chunks}
    rerequests: dict[tuple[int, int], int] = {key: 0 for key in ours}
    phases: dict[tuple[int, int], list[tuple[float, float, float]]] = {key: [] for key in ours}
    if args.nodelay:
        enable_nodelay()
    with tempfile.TemporaryDirectory(prefix="lf-bench-pull-") as tmp:
        root = Path(tmp)
        bench_keys = BenchKeys.create(root / "keys")
        broker = start_broker(project_config(max(chunks)), root / "broker")
        repo_proc = pub_proc = None
        subscriber = None
        device = None
        try:
            from fleet.repository import BlobStore
            store = BlobStore(root / "repo", bench_keys.trusted())
            repo_proc, repo = spawn(repository_main, broker.url, str(root / "repo"), str(bench_keys.dir), args.nodelay,
                                    None if args.start_s is None else {"start_s": args.start_s})
            pub_proc, pub = spawn(raw_publisher_main, broker.url, "5", args.nodelay)
            expect(repo, "ready")
            expect(pub, "ready")
            subscriber = RawSubscriber(broker.url, "raw/bench/pull")
            head_at: list[float] = []
            device = make_device(broker.url, "bench-device", root / "device", bench_keys.trusted(),
                                 events=lambda e: head_at.append(time.monotonic())
                                 if e.details.get("step") == "head_verified" else None)
            device.link.start()
            if not device.link.wait_connected(15):
                raise RuntimeError(f"device cannot connect to {broker.url}: {device.link.last_error}")
            seed = 0
            log(f"mqtt_pull: {size / MB:g} MB model, chunks {[c // KiB for c in chunks]} KiB, windows {list(windows)}, "
                f"{repeats} repeat(s), broker {broker.url}")
            for repeat in range(repeats):
                for chunk in chunks:
                    count = -(-size // chunk)
                    subscriber.expect(count)
                    start = time.perf_counter()
                    pub.send(("publish", subscriber.topic, chunk, count))
                    if not subscriber.done.wait(120):
                        raise RuntimeError(f"raw subscriber got {subscriber.count} of {count} messages in 120 s")
                    raw_s = time.perf_counter() - start
                    expect(pub, "done", 120)
                    raw[chunk].append(size / raw_s / MB)
                    for window in windows:
                        seed += 1
                        blob_id = add_random_blob(store, bench_keys, size, chunk, seed).blob_id
                        device.downloader.max_inflight_bytes = window * chunk
                        head_at.clear()
                        start = time.monotonic()
                        device.downloader.fetch(blob_id, window=window, timeout_s=60)
                        end = time.monotonic()
                        elapsed = end - start
                        plan = device.downloader.last_plan
                        # head: request -> manifest verified; chunks: -> last chunk written; tail: -> fetch returned
                        phases[(chunk, window)].append((head_at[0] - start, plan.last_progress - head_at[0],
                                                        end - plan.last_progress))
                        assert plan is not None and plan.window == window, "the window asked for is not the one used"
                        rerequests[(chunk, window)] += plan.rerequests
                        device.downloader.discard(blob_id)
                        remove_blob(store, blob_id)
                        ours[(chunk, window)].append(size / elapsed / MB)
                        log(f"  run {repeat + 1}: chunk {chunk // KiB} KiB window {window:2d}: "
                            f"ours {size / elapsed / MB:6.1f} MB/s, raw {raw[chunk][-1]:6.1f} MB/s")
        finally:
            if device is not None:
                device.link.stop()
            if subscriber is not None:
                subscriber.close()
            if pub_proc is not None:
                finish(pub_proc, pub)
            if repo_proc is not None:
                finish(repo_proc, repo)
            broker.close()

    report = Report(f"One device pulling a {size / MB:g} MB model over MQTT vs raw mosquitto (same bytes, same chunks)",
                    ["chunk KiB", "window", "in flight KiB", "ours MB/s", "raw MB/s", "ratio vs raw", "head ms",
                     "chunks MB/s", "tail ms", "re-requests"])
    medians = {key: median(values) for key, values in ours.items()}
    raw_medians = {chunk: median(values) for chunk, values in raw.items()}
    for (chunk, window), mbps in medians.items():
        head_s, chunks_s, tail_s = (median([p[i] for p in phases[(chunk, window)]]) for i in range(3))
        report.add(chunk // KiB, window, chunk * window // KiB, round(mbps, 1), round(raw_medians[chunk], 1),
                   fmt_ratio(ratio(mbps, raw_medians[chunk])), round(head_s * 1000, 1),
                   round(size / chunks_s / MB, 1), round(tail_s * 1000, 1), rerequests[(chunk, window)])
    best_key = max(medians, key=medians.get)
    lean = near_best(medians)
    default = (DEFAULT_CHUNK_SIZE, max_window(DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, DEFAULT_MAX_INFLIGHT_BYTES))
    report.notes += [
        "phases (medians): head = fetch() until the manifest is verified (opening the pull connection, subscribe, "
        "request, repository lookup, signature, precheck, head saved); chunks = from there to the last chunk written (the rate is "
        "over the whole model, including the repository's hold of a new stream's first chunks: start_s "
        f"{'default' if args.start_s is None else f'{args.start_s:g} s'}); tail = last chunk until fetch() "
        "returns (the model is handed over as a map of model.part: nothing re-read or hashed again)",
        "TCP_NODELAY: set by the device's pull connection (agent/blob_link.py) and the repository's link "
        f"(agent/mqtt.py); on the raw paho clients: {'yes (--nodelay)' if args.nodelay else 'no (paho leaves Nagle on; --nodelay sets it)'}",
        f"median of {repeats} run(s) each; MB = 10^6 bytes; ours = Downloader.fetch() wall time incl. head "
        f"request, signature check, per-chunk sha256 and writes to model.part",
        "raw = bare paho publisher process -> mosquitto -> bare paho subscriber counting messages, QoS 1, "
        "paho's default 20 in flight, MQTT 5, same chunk size and total bytes",
        f"broker limits (from fleet.broker.render_mosquitto_conf): {'; '.join(project_tuning(max(chunks)))}",
        f"best: chunk {best_key[0] // KiB} KiB window {best_key[1]} at {medians[best_key]:.1f} MB/s "
        f"({fmt_ratio(ratio(medians[best_key], raw_medians[best_key[0]]))} of raw); least in flight within "
        f"{NEAR_BEST:.0%} of the best: chunk {lean[0] // KiB} KiB window {lean[1]}",
    ]
    if default in medians:
        got = ratio(medians[default], raw_medians[default[0]]) or 0.0
        report.verdict(f"ours >= {TARGET:.0%} of raw at the defaults (chunk {default[0] // KiB} KiB, window {default[1]})",
                       got >= TARGET, f"{medians[default]:.1f} MB/s vs raw {raw_medians[default[0]]:.1f} MB/s = {got:.2f}x")
    got = ratio(medians[best_key], raw_medians[best_key[0]]) or 0.0
    report.verdict(f"ours >= {TARGET:.0%} of raw at the best setting measured", got >= TARGET,
                   f"chunk {best_key[0] // KiB} KiB window {best_key[1]}: {medians[best_key]:.1f} MB/s vs raw "
                   f"{raw_medians[best_key[0]]:.1f} MB/s = {got:.2f}x")
    report.data.update({"size_bytes": size, "repeats": repeats, "raw_nodelay": bool(args.nodelay),
                        "ours_mbps": {f"{c}/{w}": v for (c, w), v in ours.items()},
                        "raw_mbps": {str(c): v for c, v in raw.items()},
                        "best": {"chunk": best_key[0], "window": best_key[1]},
                        "near_best": {"chunk": lean[0], "window": lean[1]}})
    report.print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
