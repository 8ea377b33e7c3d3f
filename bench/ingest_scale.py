"""Benchmark: fleet ingest at scale, beside ``mosquitto_sub -q 1`` on the same stream in the same run.

5,000 simulated devices publish telemetry (QoS 1, realistic documents shaped like
agent/telemetry.py ``collect()`` output, each device with its own increasing seq) at a fixed
rate (default 10,000 msgs/s) for a fixed time into a local mosquitto with the project's
settings (``tests.support.broker.plain_config``: nothing dropped, nothing limited). Two
consumers read the same stream at once:

* ours: ``fleet.ingest.run_workers`` (N processes sharing ``$share/litefleet/...``, each
  receiving through ``fleet.ingest_link.IngestLink`` and acking after each commit) writing
  into the store (SQLite by default, ``--db postgresql://``);
* raw: ``mosquitto_sub -q 1 -t lf/v1/bench/device/+/telemetry -F %t``, lines counted.

The publisher is a small raw-socket MQTT 3.1.1 client (one process per ``--publishers``):
paho's own publisher tops out below the target rate on this machine. Messages lost come from
``Store.losses()`` (gaps in each device's seq) and from comparing counts; both must be 0.
CPU seconds per message (user + system, from the start of publishing until both consumers
have everything) are printed beside the rates: on a shared machine they move less than rates.

    .venv/bin/python -m bench.ingest_scale [--quick] [--json] [--rate 10000] [--seconds 30]
        [--workers 2] [--publishers 1] [--db postgresql://postgres@127.0.0.1/test]
    .venv/bin/python -m bench.ingest_scale --link-cost    # the receive path alone: paho beside IngestLink

With ``--db postgresql://.../DB``, a throwaway database ``lf_bench_<pid>_<hex>`` is created on
that server and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.store_write import telemetry_doc  # noqa: E402

FLEET = "bench"
DEVICES = 5_000
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


# --------------------------------------------------------------------------- the publisher

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


def message_template(device: int) -> tuple[bytes, bytes]:
    """(topic, payload template with %d for seq and %s for ts) of one device's telemetry."""
    device_id = f"dev-{device:05d}"
    doc = {"v": 1, "device_id": device_id, "seq": 1234567890123, "ts": 9876543210.5,
           "data": telemetry_doc(device, 7, 1.5e9)}
    text = json.dumps(doc, separators=(",", ":"))
    text = text.replace("%", "%%").replace("1234567890123", "%d").replace("9876543210.5", "%s")
    return f"lf/v1/{FLEET}/device/{device_id}/telemetry".encode(), text.encode()


def publisher_main(conn: Any, host: str, port: int, first: int, last: int, rate: float, seconds: float,
                   window: int = 20_000) -> None:
    """Child: devices ``first..last-1`` publish round-robin at ``rate`` msgs/s for ``seconds``.

    Replies ("ready",) once connected, waits for ("go", t0), then sends ("done", stats).
    """
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = f"bench-pub-{first}-{os.getpid()}".encode()
    var = _str(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0)
    body = var + _str(cid)
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        conn.send(("error", f"publisher: bad CONNACK {connack!r}"))
        return
    templates = [message_template(d) for d in range(first, last)]
    headers = [_str(t) for t, _ in templates]
    seqs = [0] * len(templates)
    acked = [0]
    cond = threading.Condition()

    def reader() -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            n = len(buf) // 4          # PUBACKs only: 0x40 0x02 mid mid
            if n:
                buf = buf[n * 4:]
                with cond:
                    acked[0] += n
                    cond.notify_all()

    threading.Thread(target=reader, daemon=True).start()
    conn.send(("ready",))
    msg = conn.recv()
    t0 = msg[1]
    while time.time() < t0:
        time.sleep(min(0.01, t0 - time.time()))
    total = int(rate * seconds)
    sent = 0
    mid = 0
    n_dev = len(templates)
    out: list[bytes] = []
    start = time.monotonic()
    while sent < total:
        # send what the schedule says is due, in one write
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due <= sent:
            time.sleep(0.001)
            continue
        with cond:
            cond.wait_for(lambda: sent - acked[0] < window, 10)
        due = min(due, sent + 500)
        while sent < due:
            i = sent % n_dev
            mid = mid % 65535 + 1
            payload = templates[i][1] % (seqs[i], repr(time.time()).encode())
            seqs[i] += 1
            rest = headers[i] + struct.pack(">H", mid) + payload
            out.append(b"\x32" + _varint(len(rest)) + rest)
            sent += 1
        sock.sendall(b"".join(out))
        out.clear()
    elapsed = time.monotonic() - start
    with cond:
        cond.wait_for(lambda: acked[0] >= sent, 30)
    sock.sendall(b"\xe0\x00")   # DISCONNECT
    conn.send(("done", {"sent": sent, "acked": acked[0], "seconds": elapsed,
                        "last_seq": {f"dev-{first + i:05d}": s - 1 for i, s in enumerate(seqs) if s}}))
    sock.close()


# --------------------------------------------------------------------------- the raw subscriber

class RawSubscriber:
    """``mosquitto_sub -q 1 -F %t`` on the telemetry filter (+ a probe topic), lines counted."""

    def __init__(self, port: int) -> None:
        self.probe = f"lf/v1/{FLEET}/probe"
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-i", f"bench-raw-{os.getpid()}",
             "-t", f"lf/v1/{FLEET}/device/+/telemetry", "-t", self.probe, "-F", "%t"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines = 0
        self.probes = 0
        self.first = 0.0
        self.last = 0.0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        probe = self.probe.encode()
        out = self.proc.stdout
        assert out is not None
        while True:
            data = out.read1(1 << 16)
            if not data:
                return
            n = data.count(b"\n")
            p = data.count(probe)
            now = time.time()
            if n - p > 0:
                if not self.first:
                    self.first = now
                self.last = now
                self.lines += n - p
            self.probes += p

    def wait_ready(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.probes == 0 and time.monotonic() < deadline:
            subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-t", self.probe, "-m", "x"],
                           check=True, timeout=5)
            wait_until(lambda: self.probes > 0, 0.5)
        if self.probes == 0:
            raise RuntimeError("mosquitto_sub did not receive the probe message")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)   # polling interval of a deadline loop
    return bool(predicate())


def _cpu(pid: int) -> float:
    import psutil
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        return t.user + t.system
    except Exception:
        return 0.0


# --------------------------------------------------------------------------- the run

def _pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg
    name = f"lf_bench_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    return name, urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _pg_drop(admin_url: str, name: str) -> None:
    import psycopg
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(rate: float, seconds: float, workers: int, publishers: int, db: str | None, devices: int = DEVICES,
        drain_timeout: float = 120.0) -> dict[str, Any]:
    from bench.support import spawn, expect, finish
    from fleet.ingest import run_workers
    from fleet.store import open_store
    from tests.support.broker import Mosquitto, plain_config

    tmp = Path(tempfile.mkdtemp(prefix="lf-ingest-bench-"))
    pg_name = None
    if db and db.startswith(("postgresql://", "postgres://")):
        pg_name, db_url = _pg_database(db)
    else:
        db_url = db or str(tmp / "fleet.db")
    broker = Mosquitto(plain_config, tmp / "broker").start()
    pool = raw = None
    pubs: list[tuple[Any, Any]] = []
    try:
        store = open_store(db_url)
        store.migrate()
        pool = run_workers(workers, broker.url, db_url, FLEET, client_id_prefix=f"bench-ingest-{os.getpid()}")
        if not wait_until(lambda: pool.stats().get("subscribed", 0) == workers, 30):
            raise RuntimeError(f"ingest workers did not subscribe: {pool.stats()}")
        raw = RawSubscriber(broker.port)
        raw.wait_ready(broker.port)
        per = devices // publishers
        for k in range(publishers):
            first, last = k * per, devices if k == publishers - 1 else (k + 1) * per
            proc, conn = spawn(publisher_main, "127.0.0.1", broker.port, first, last, rate / publishers, seconds)
            expect(conn, "ready")
            pubs.append((proc, conn))
        cpu_pids = {"ingest": pool.pids, "mosquitto_sub": [raw.proc.pid], "mosquitto": [broker.proc.pid],
                    "publisher": [p.pid for p, _ in pubs]}
        cpu0 = {k: sum(_cpu(p) for p in v) for k, v in cpu_pids.items()}
        t0 = time.time() + 0.5
        for _, conn in pubs:
            conn.send(("go", t0))
        done = [expect(conn, "done", seconds * 4 + 60)[1] for _, conn in pubs]
        t_pub_end = time.time()
        sent = sum(d["sent"] for d in done)
        last_seq: dict[str, int] = {}
        for d in done:
            last_seq.update(d["last_seq"])
        ours_done = [0.0]

        def ours_finished() -> bool:
            s = pool.stats()
            if s.get("telemetry", 0) >= sent and not ours_done[0]:
                ours_done[0] = time.time()
            return bool(ours_done[0])

        wait_until(lambda: ours_finished() and raw.lines >= sent, drain_timeout, 0.05)
        cpu1 = {k: sum(_cpu(p) for p in v) for k, v in cpu_pids.items()}
        stats = pool.stats()
        losses = store.losses()
        lost_gaps = sum(int(v.get("lost") or 0) for v in losses.values())
        received = sum(int(v.get("received") or 0) for v in losses.values())
        # messages missing at the end of a device's stream are no gap: compare with what was sent
        tail_missing = sum(max(0, s - int(losses.get(d, {}).get("max_seq", -1))) for d, s in last_seq.items())
        store.close()
        ours_end = ours_done[0] or time.time()
        result = {
            "devices": devices, "rate_target": rate, "seconds": seconds, "workers": workers,
            "publishers": publishers, "backend": "postgresql" if pg_name else "sqlite",
            "published": sent, "broker_acked": sum(d["acked"] for d in done),
            "publish_rate": sent / max(d["seconds"] for d in done),
            "ours_stored": received, "ours_rate": received / max(1e-9, ours_end - t0),
            "ours_drain_s": max(0.0, ours_end - t_pub_end),
            "raw_lines": raw.lines, "raw_rate": raw.lines / max(1e-9, (raw.last or time.time()) - t0),
            "raw_drain_s": max(0.0, (raw.last or time.time()) - t_pub_end),
            "lost_gaps": lost_gaps, "lost_total": (sent - received), "lost_tail": tail_missing,
            "duplicates": stats.get("duplicates", 0), "malformed": stats.get("malformed", 0),
            "db_errors": stats.get("db_errors", 0), "batches": stats.get("batches", 0),
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        }
        result["ratio"] = result["ours_rate"] / result["raw_rate"] if result["raw_rate"] else None
        result["cpu_us_per_msg"] = {k: round(v * 1e6 / max(1, sent), 1) for k, v in result["cpu_s"].items()}
        return result
    finally:
        for proc, conn in pubs:
            finish(proc, conn, 5)
        if raw is not None:
            raw.close()
        if pool is not None:
            pool.stop()
        broker.close()
        if pg_name:
            _pg_drop(db, pg_name)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the receive path alone

def link_cost(messages: int = 100_000, devices: int = DEVICES) -> dict[str, dict[str, float]]:
    """CPU per message of the MQTT receive path alone: paho ``MqttLink`` (inline handler, manual
    acks) beside ``IngestLink``, each draining the same number of queued QoS 1 telemetry messages
    from its persistent session with a handler that only keeps them and acks. No JSON, no store."""
    from agent.mqtt import MqttLink
    from bench.support import expect, finish, spawn
    from fleet.ingest_link import IngestLink
    from tests.support.broker import Mosquitto, plain_config

    topic_filter = f"lf/v1/{FLEET}/device/+/telemetry"

    def paho_link(got: list) -> Any:
        link = MqttLink(broker.url, "cost-paho", manual_ack=True, backoff=(0.1, 0.5))

        def handler(message: Any) -> None:
            got.append(message)
            if len(got) % 2000 == 0:
                link.ack(got[-2000:])
        return link, link.subscribe(topic_filter, handler, inline=True)

    def ingest_link(got: list) -> Any:
        link = IngestLink(broker.url, "cost-ingest-link", backoff=(0.1, 0.5))

        def handler(batch: list) -> None:
            got.extend(batch)
            link.ack([token for _, _, token in batch])
        return link, link.subscribe_batches([topic_filter], handler)

    tmp = Path(tempfile.mkdtemp(prefix="lf-link-cost-"))
    broker = Mosquitto(plain_config, tmp / "broker").start()
    out: dict[str, dict[str, float]] = {}
    try:
        for make in (paho_link, ingest_link):       # create both sessions, then go away
            link, token = make([])
            link.start()
            if not token.wait(10):
                raise RuntimeError(f"{link.client_id} did not subscribe")
            link.stop()
        rate = 20_000
        proc, conn = spawn(publisher_main, "127.0.0.1", broker.port, 0, devices, rate, messages / rate)
        try:
            expect(conn, "ready")
            conn.send(("go", time.time()))
            sent = expect(conn, "done", 120)[1]["sent"]
        finally:
            finish(proc, conn, 5)
        for name, make in (("paho MqttLink", paho_link), ("IngestLink", ingest_link)):
            got: list = []
            link, _ = make(got)
            cpu0, wall0 = time.process_time(), time.monotonic()
            link.start()
            if not wait_until(lambda: len(got) >= sent, 120, 0.01):
                raise RuntimeError(f"{name} received {len(got)} of {sent}")
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            link.stop()
            out[name] = {"messages": sent, "cpu_us_per_msg": round(cpu * 1e6 / sent, 1),
                         "msgs_per_s": round(sent / wall)}
    finally:
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 s instead of 30 s")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--rate", type=float, default=10_000, help="messages per second (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=None, help="publishing time (default 30, quick 3)")
    parser.add_argument("--workers", type=int, default=2, help="ingest processes (default: %(default)s)")
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--link-cost", action="store_true",
                        help="measure only the MQTT receive path: paho MqttLink beside IngestLink on 100,000 "
                             "queued messages (no JSON, no store)")
    parser.add_argument("--db", default=None, help="postgresql://... server (a throwaway database is made there); "
                                                   "default: a SQLite file in a temp dir")
    args = parser.parse_args(argv)
    if args.link_cost:
        cost = link_cost()
        for name, c in cost.items():
            print(f"  {name + ':':15} {c['cpu_us_per_msg']:6.1f} us CPU/msg  {c['msgs_per_s']:8.0f} msgs/s  "
                  f"({c['messages']} queued QoS 1 messages)")
        if args.json:
            print(json.dumps(cost, indent=2))
        return 0
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    r = run(args.rate, seconds, args.workers, args.publishers, args.db, args.devices)
    print(f"ingest scale: {r['devices']} devices, {r['published']} telemetry messages at {r['publish_rate']:.0f} msgs/s "
          f"for {seconds:g}s; {r['workers']} ingest process(es) -> {r['backend']}")
    print(f"  ours (fleet.ingest -> store): {r['ours_rate']:8.0f} msgs/s  stored {r['ours_stored']}  "
          f"drained {r['ours_drain_s']:.2f}s after the last publish  cpu {r['cpu_s']['ingest']:.1f}s "
          f"({r['cpu_us_per_msg']['ingest']:.0f} us/msg)")
    print(f"  raw (mosquitto_sub -q 1):     {r['raw_rate']:8.0f} msgs/s  lines  {r['raw_lines']}  "
          f"drained {r['raw_drain_s']:.2f}s after the last publish  cpu {r['cpu_s']['mosquitto_sub']:.1f}s "
          f"({r['cpu_us_per_msg']['mosquitto_sub']:.0f} us/msg)")
    print(f"  ratio ours/raw: {r['ratio']:.3f}x   lost: {r['lost_total']} (gaps {r['lost_gaps']}, "
          f"tail {r['lost_tail']})   duplicates {r['duplicates']}  db errors {r['db_errors']}  "
          f"batches {r['batches']}   cpu s: {r['cpu_s']}")
    if args.json:
        print(json.dumps(r, indent=2))
    ok = r["lost_total"] == 0 and r["lost_gaps"] == 0 and r["lost_tail"] == 0 and r["raw_lines"] >= r["published"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
