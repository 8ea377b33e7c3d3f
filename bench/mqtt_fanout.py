"""Benchmark: 100 devices pulling the same model at once, against one device alone in the same run.

One local mosquitto with the project's limits (see bench/support.py), the real
``RepositoryService`` in its own process, and simulated devices in a few worker processes:
each device is built as the agent builds it: its own ``MqttLink`` (connected before the start),
a ``Downloader`` on a ``BlobLink`` of its own (opened by each fetch, as on a device), a state
directory, a real ``Installer`` + ``ModelStore`` (fetch only). The fetch command reaches every
worker at once and each device fetches on its own thread.

Two figures, each beside its baseline:

* bytes the repository published (``RepositoryService.stats['bytes_published']``, chunk and
  head payloads) against the model's size: one shared stream per blob means 100 devices should
  cost about one copy (target <= 1.2x);
* wall time of the 100 against one device alone (the median of one alone before and one after).

Each pull uses its own signed random model of the same size, so what the repository remembers
of one pull never serves the next. The default chunk size and window (1 MiB, 4 in flight).

The notes say where copies came from: how many times each chunk went out, how the devices' first
requests spread in time, and how long the repository held the first chunks for devices still
to come (its gathering: ``--gather-s``, ``--start-s`` and ``--settle-s`` change it, 0 turns each off; see
``fleet.repository.ChunkScheduler``). ``--trace FILE`` writes every request of the fan-out (time,
device, head, chunks, what was published for it) as JSON.

    .venv/bin/python -m bench.mqtt_fanout [--quick] [--json] [--devices 100] [--size-mb 4]
                                          [--gather-s S] [--start-s S] [--settle-s S] [--trace FILE]
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import Report, fmt_ratio, log, parse_args, ratio
from bench.support import (MB, BenchKeys, add_random_blob, devices_main, enable_nodelay, expect, finish, median,
                           project_config, repository_main, spawn, start_broker)

from agent.protocol.manifest import DEFAULT_CHUNK_SIZE
from agent.transfer import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_WINDOW, max_window

TARGET_BYTES = 1.2      # repository bytes published <= 1.2 x model size
WORKERS = 4             # processes hosting the simulated devices (2 cores here)
TIMEOUT_S = 120


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument("--devices", type=int, default=None, help="devices fetching at once (default 100; --quick 10)")
        parser.add_argument("--size-mb", type=float, default=None, help="model size in MB (default 4; --quick 1)")
        parser.add_argument("--nodelay", action="store_true",
                            help="what-if: every paho client sets TCP_NODELAY (see bench/support.py)")
        parser.add_argument("--gather-s", type=float, default=None,
                            help="what-if: how long the repository waits for a device that asked for the head "
                                 "to ask for chunks (default: the repository's own; 0 turns it off)")
        parser.add_argument("--start-s", type=float, default=None,
                            help="what-if: how long a new stream's first chunks wait (default: the "
                                 "repository's own; 0 turns it off)")
        parser.add_argument("--settle-s", type=float, default=None,
                            help="what-if: how long held chunks wait after the latest device joined (default: "
                                 "the repository's own; 0 turns it off)")
        parser.add_argument("--trace", type=Path, default=None,
                            help="write the fan-out's request log (time s, device, head, chunks, published) as JSON")
    args = parse_args("100 devices pulling one model at once vs one device alone", argv, extra)
    count = args.devices or (10 if args.quick else 100)
    size = int((args.size_mb or (1 if args.quick else 4)) * MB)
    chunk = DEFAULT_CHUNK_SIZE
    window = max_window(chunk, DEFAULT_WINDOW, DEFAULT_MAX_INFLIGHT_BYTES)   # what a device uses
    workers = min(WORKERS, count)
    if args.nodelay:
        enable_nodelay()

    alone_s: list[float] = []
    alone_bytes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-fanout-") as tmp:
        root = Path(tmp)
        bench_keys = BenchKeys.create(root / "keys")
        broker = start_broker(project_config(chunk), root / "broker")
        children = []
        try:
            from fleet.repository import BlobStore
            store = BlobStore(root / "repo", bench_keys.trusted())
            gathering = {k: v for k, v in (("gather_s", args.gather_s), ("start_s", args.start_s),
                                           ("settle_s", args.settle_s)) if v is not None}
            repo_proc, repo = spawn(repository_main, broker.url, str(root / "repo"), str(bench_keys.dir), args.nodelay,
                                    gathering)
            children.append((repo_proc, repo))
            names = [f"dev{i:03d}" for i in range(count)]
            groups = [names[i::workers] for i in range(workers)]
            fleet = [spawn(devices_main, broker.url, group, str(root / "devices"), str(bench_keys.dir), args.nodelay)
                     for group in groups]
            solo_proc, solo = spawn(devices_main, broker.url, ["solo"], str(root / "devices"), str(bench_keys.dir),
                                    args.nodelay)
            children += [*fleet, (solo_proc, solo)]
            for _, conn in children:
                expect(conn, "ready", 120)
            log(f"mqtt_fanout: {count} devices in {workers} processes + 1 alone, {size / MB:g} MB model, "
                f"chunks {chunk // 1024} KiB, window {window}, broker {broker.url}")

            def stats() -> dict:
                repo.send(("stats",))
                return expect(repo, "stats")[1]

            pulled: list[str] = []

            def pull(conns, seed: int) -> tuple[float, int, list]:
                blob_id = add_random_blob(store, bench_keys, size, chunk, seed).blob_id
                pulled.append(blob_id)
                before = stats()["bytes_published"]
                start = time.perf_counter()
                for conn in conns:
                    conn.send(("fetch", blob_id, window, TIMEOUT_S))
                results = []
                for conn in conns:
                    results += expect(conn, "done", TIMEOUT_S + 60)[1]
                wall = time.perf_counter() - start
                return wall, stats()["bytes_published"] - before, results

            wall, published, results = pull([solo], 1)
            alone_s.append(wall)
            alone_bytes.append(published)
            log(f"  alone: {wall:.2f} s, {published / MB:.2f} MB published")
            fan_wall, fan_bytes, fan_results = pull([conn for _, conn in fleet], 2)
            repo.send(("requests",))
            fan_requests = [r[:5] for r in expect(repo, "requests")[1] if r[5] == pulled[-1]]
            log(f"  {count} at once: {fan_wall:.2f} s, {fan_bytes / MB:.2f} MB published")
            wall, published, results = pull([solo], 3)
            alone_s.append(wall)
            alone_bytes.append(published)
            log(f"  alone again: {wall:.2f} s, {published / MB:.2f} MB published")
        finally:
            for proc, conn in children:
                finish(proc, conn)
            broker.close()

    failures = [r for r in fan_results if r[1] is None]
    n_chunks = -(-size // chunk)
    per_index = [0] * n_chunks                       # how often each chunk went out during the fan-out
    asks = [0] * n_chunks                            # how many devices asked for it
    first_ask = min((r[0] for r in fan_requests), default=0.0)
    late_heads = sum(1 for r in fan_requests if r[2] and r[0] - first_ask > 1.0)
    firsts: dict[str, float] = {}                    # each device's first request, from the first of all
    for t, device, *_rest in fan_requests:
        if device:                                   # "" = held chunks released when the gathering ran out
            firsts.setdefault(device, t - first_ask)
    spread = sorted(firsts.values())
    first_chunk_out = min((r[0] - first_ask for r in fan_requests if any(i >= 0 for i in r[4])), default=None)
    first_chunk_ask = min((r[0] - first_ask for r in fan_requests if r[3]), default=None)
    if args.trace:
        args.trace.write_text(json.dumps({"t0": first_ask, "requests": [
            {"t": round(t - first_ask, 4), "device": d, "head": h, "chunks": list(c), "published": list(p)}
            for t, d, h, c, p in fan_requests]}, indent=1))
    for _t, _device, _head, chunks, published in fan_requests:
        for index in chunks:
            asks[index] += 1
        for index in published:
            if index >= 0:
                per_index[index] += 1
    times = [r[1] for r in fan_results if r[1] is not None]
    alone = median(alone_s)
    report = Report(f"{count} devices pulling one {size / MB:g} MB model at once vs one device alone",
                    ["pull", "devices", "wall s", "device median s", "device max s", "published MB",
                     "published vs model", "wall vs alone", "re-requests", "failed"])
    report.add("alone (before)", 1, round(alone_s[0], 3), round(alone_s[0], 3), round(alone_s[0], 3),
               round(alone_bytes[0] / MB, 2), fmt_ratio(alone_bytes[0] / size), fmt_ratio(ratio(alone_s[0], alone)), "-", 0)
    report.add("all at once", count, round(fan_wall, 2), round(median(times), 2) if times else None,
               round(max(times), 2) if times else None, round(fan_bytes / MB, 2), fmt_ratio(fan_bytes / size),
               fmt_ratio(ratio(fan_wall, alone)), sum(r[3] for r in fan_results), len(failures))
    report.add("alone (after)", 1, round(alone_s[1], 3), round(alone_s[1], 3), round(alone_s[1], 3),
               round(alone_bytes[1] / MB, 2), fmt_ratio(alone_bytes[1] / size), fmt_ratio(ratio(alone_s[1], alone)), "-", 0)
    report.notes += [
        f"model {size} bytes in {-(-size // chunk)} chunks of {chunk // 1024} KiB, window {window}; wall = from the "
        f"fetch command to the last device's fetch() returning (each device: opening its pull connection, head, "
        f"signature, per-chunk sha256, writes); 'wall vs alone' against the median of the two alone pulls ({alone:.3f} s)",
        f"devices in {workers} worker processes; repository, broker and every device share this machine's "
        f"{__import__('os').cpu_count()} cores, so the wall time is mostly the devices' own CPU",
        "published = chunk and head payload bytes the repository published (RepositoryService.stats)",
        f"fan-out, per chunk index: times published {per_index}; requests naming it {asks}; head requests "
        f"arriving more than 1 s after the first request: {late_heads} of {sum(1 for r in fan_requests if r[2])}",
        f"fan-out, devices' first requests after the first of all (s): median "
        f"{_at(spread, 0.5)}, 90% {_at(spread, 0.9)}, last {_at(spread, 1.0)}; first chunk request at "
        f"{_ms(first_chunk_ask)}, first chunk published at {_ms(first_chunk_out)} (repository gathering: "
        f"{', '.join(f'{k} {v:g}' for k, v in gathering.items()) or 'defaults'})",
    ] + [f"failed: {r[0]}: {r[2]}" for r in failures[:5]]
    report.verdict(f"repository published <= {TARGET_BYTES}x the model for {count} devices", fan_bytes <= TARGET_BYTES * size,
                   f"{fan_bytes / MB:.2f} MB for a {size / MB:g} MB model = {fan_bytes / size:.2f}x")
    report.verdict("every device got the model", not failures, f"{count - len(failures)} of {count}")
    report.data.update({"devices": count, "size_bytes": size, "alone_s": alone_s, "fanout_s": fan_wall,
                        "fanout_bytes": fan_bytes, "device_times_s": sorted(times), "published_per_chunk": per_index,
                        "asks_per_chunk": asks, "first_request_spread_s": [round(t, 4) for t in spread],
                        "first_chunk_published_s": first_chunk_out, "gathering": gathering})
    report.print(args.json)
    return 0


def _at(ordered: list[float], q: float) -> str:
    return f"{ordered[round(q * (len(ordered) - 1))]:.3f}" if ordered else "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
