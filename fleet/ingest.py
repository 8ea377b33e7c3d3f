"""Telemetry ingest: devices' status, telemetry and events from MQTT into the fleet store, in batches.

Why it looks the way it does:

* **Shared subscriptions.** Every ingestor subscribes ``$share/<group>/lf/v1/F/device/+/<ch>``,
  so the broker spreads the stream over every ingestor of the group: several processes
  (:func:`run_workers`) or several servers against one PostgreSQL.
* **Minimal work per message.** The limit is Python's cost per message. The ingest processes
  receive through :class:`fleet.ingest_link.IngestLink`, a receive-only MQTT 5 client that
  hands over every PUBLISH of one socket read as one list (paho builds objects and makes calls
  per message; see docs/benchmarks-ingest.md); an :class:`agent.mqtt.MqttLink` still works,
  one handler call per message. Telemetry and events get: the topic split on ``/``, one JSON
  parse (``orjson`` when installed: ~3x faster than ``json`` on these documents), and the
  checks the store relies on (:func:`decode`): ``v == 1``, the
  ``device_id`` equals the topic's (a device can publish only under its own id: the broker
  ACL checks the *topic*, so this stops one device writing another's rows), ``seq`` an int
  >= 0, ``ts`` a number, ``data`` (telemetry) a dict, ``kind`` (events) a string. Full schema
  validation (agent/protocol/messages.py) costs ~5x that and is skipped: every other field is
  read by the store with type checks (``_num``/``_int``/``_text``/``_obj``), so a wrong type
  in a figure becomes NULL instead of failing the batch. Status messages are rare (birth,
  last will) and get the full schema. Malformed messages are counted, acknowledged and
  dropped, with a throttled log line saying why.
* **No loss: acknowledge after commit.** The link acknowledges nothing by itself
  (``IngestLink`` never does; ``MqttLink`` with ``manual_ack=True``): a QoS 1
  message is acknowledged to the broker only after the batch holding it is committed. If the
  process dies (SIGKILL) between arrival and commit, the broker still holds the message in
  this client's persistent session and delivers it again when the same client id reconnects;
  the store drops the duplicates on (device_id, seq).
* **Bounded memory when the database is down.** Unacknowledged messages count against the
  MQTT 5 Receive Maximum the link sends in CONNECT (``receive_maximum``, 65535 by default):
  once that many wait for the database, the broker stops sending to this client and queues
  the rest in its own store (mosquitto: ``max_queued_messages 0`` / ``max_queued_bytes``).
  So this process holds at most ``receive_maximum`` messages (~1 KB each: ~65 MB); beyond
  that the backlog lives in the broker and is limited by the broker's queue settings (with
  ``max_queued_bytes`` reached, mosquitto drops new QoS 1 messages: size it for the longest
  database outage to ride out). ``IngestLink`` speaks MQTT 5 only for this reason; an
  ``MqttLink`` that fell back to 3.1.1 has no Receive Maximum, and the broker's
  ``max_inflight_messages`` bounds it instead (and also limits throughput).
  While the database is unavailable the batch is kept and retried with exponential backoff;
  ``stats()['problem']`` and a throttled log line say "database unavailable since ...".
* **A poison batch cannot wedge ingest.** A batch failing with anything but
  ``StoreUnavailableError`` is split in halves and retried; a single message the store
  still refuses is dropped, counted as ``rejected`` and logged.

mosquitto (2.0.11, measured) keeps routing a shared subscription's share to a member whose
persistent session is offline, queueing it there until that client id reconnects: a dead
ingest process must be restarted under the same client id (:class:`IngestWorkers` does).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import MAX_JSON_BYTES, MessageError
from agent.protocol.messages import decode as decode_full
from agent.protocol.topics import Topics
from fleet.store import IngestBatch, StoreUnavailableError

log = logging.getLogger("litefleet.ingest")

CHANNELS = ("status", "telemetry", "events")
try:   # optional (the host extra installs it): same results as json.loads on valid JSON, ~3x faster
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads


class Malformed(ValueError):
    """A message the ingestor drops; the text says why (for the throttled log line)."""


def decode(topic: str, payload: bytes) -> tuple[str, str, Any]:
    """``(channel, device_id, item)`` of one message, or :class:`Malformed`.

    ``item`` is what :class:`IngestBatch` holds: the status message for status,
    ``(device_id, seq, ts, data)`` for telemetry, ``(device_id, seq, ts, message)`` for events.
    An empty status payload (a cleared retained message) gives item ``None``: nothing to store.
    """
    parts = topic.split("/")
    if len(parts) != 6 or parts[3] != "device":
        raise Malformed(f"{topic}: not a device topic")
    channel, device_id = parts[5], parts[4]
    if len(payload) > MAX_JSON_BYTES:
        raise Malformed(f"{topic}: {len(payload)} bytes is over the {MAX_JSON_BYTES}-byte limit")
    if channel == "status":
        if not payload:
            return channel, device_id, None
        try:
            msg = decode_full(payload, "status", topic)
        except MessageError as exc:
            raise Malformed(str(exc)) from None
        if msg["device_id"] != device_id:
            raise Malformed(f"{topic}: device_id {msg['device_id']!r} does not match the topic")
        return channel, device_id, msg
    try:
        msg = _loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Malformed(f"{topic}: not valid JSON ({str(exc)[:80]})") from None
    if msg.__class__ is not dict:
        raise Malformed(f"{topic}: not a JSON object")
    if msg.get("v") != 1 or msg.get("v").__class__ is not int:
        raise Malformed(f"{topic}: field v must be 1 (got {msg.get('v')!r})")
    if msg.get("device_id") != device_id:
        raise Malformed(f"{topic}: device_id {msg.get('device_id')!r} does not match the topic")
    seq = msg.get("seq")
    if seq.__class__ is not int or seq < 0:
        raise Malformed(f"{topic}: field seq must be an integer >= 0 (got {seq!r})")
    ts = msg.get("ts")
    if ts.__class__ is not float and ts.__class__ is not int:
        raise Malformed(f"{topic}: field ts must be a number (got {ts!r})")
    if channel == "telemetry":
        data = msg.get("data")
        if data.__class__ is not dict:
            raise Malformed(f"{topic}: field data must be an object")
        return channel, device_id, (device_id, seq, ts, data)
    if channel == "events":
        if msg.get("kind").__class__ is not str:
            raise Malformed(f"{topic}: field kind must be a string")
        return channel, device_id, (device_id, seq, ts, msg)
    raise Malformed(f"{topic}: channel {channel!r} is not ingested")


class _Throttled:
    """Logs the first occurrence, then at most one line per ``interval_s`` with a count."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        extra = f" (and {self._suppressed} more like it since the last line)" if self._suppressed else ""
        log.warning(text + extra, *args)
        self._suppressed = 0
        self._next = now + self.interval_s


@dataclass(slots=True)
class _Pending:
    channel: str
    item: Any
    message: Any          # what the link's ack() takes: an agent.mqtt.Message or an IngestLink token
    arrived: float
    topic: str


class Ingestor:
    """Subscribes a fleet's status, telemetry and events on ``link`` and writes them to ``store``.

    ``link`` should be a :class:`fleet.ingest_link.IngestLink` (batches, acks only by
    :meth:`ack`) or an :class:`agent.mqtt.MqttLink` with ``manual_ack=True``, either with a
    persistent session (fixed client id, ``clean_start=False``); an ``MqttLink`` with
    ``manual_ack=False`` acks on arrival and a crash loses what was not yet written. The caller
    owns the link (start/stop it); :meth:`start` only subscribes and starts the writer thread.
    """

    def __init__(self, link: Any, store: Any, fleet: str, *, share_group: str | None = "litefleet",
                 batch_max: int = 2000, flush_ms: int = 200, backoff: tuple[float, float] = (0.2, 10.0),
                 qos: int = 1) -> None:
        if batch_max < 1 or flush_ms < 0:
            raise ValueError("batch_max must be >= 1 and flush_ms >= 0")
        self.link = link
        self.store = store
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.share_group = share_group
        self.batch_max = batch_max
        self.flush_s = flush_ms / 1000.0
        self.backoff = backoff
        self.qos = qos
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bad = _Throttled()
        self._dbwarn = _Throttled()
        self._started = time.time()
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)   # (monotonic, messages written) samples
        self._c = dict(received=0, messages=0, telemetry=0, events=0, statuses=0, duplicates=0, malformed=0,
                       rejected=0, batches=0, db_errors=0, acked=0)
        self._db_error: str | None = None
        self._db_down_since: float | None = None
        self._writing_since: float | None = None
        self._last_batch_ms = 0.0
        self._tokens: list[Any] = []
        self._in_write = 0      # taken from _pending, not yet written

    # -- filters ----------------------------------------------------------------------------
    def filters(self) -> list[str]:
        """The subscription filters, shared when a group is set."""
        plain = [self.topics.all_devices(ch) for ch in CHANNELS]
        return [f"$share/{self.share_group}/{f}" for f in plain] if self.share_group else plain

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()
        batches = getattr(self.link, "subscribe_batches", None)
        if batches is not None:
            self._tokens = [batches(self.filters(), self._on_batch, qos=self.qos)]
            return
        # Inline: the handler only decodes and appends, so it runs on the link's network thread
        # (no queue hand-off and thread switch per message; measured in docs/benchmarks-ingest.md).
        self._tokens = [self.link.subscribe(f, self._on_message, qos=self.qos, inline=True) for f in self.filters()]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the writer after one last attempt to write what is pending (unwritten messages
        stay unacknowledged: the broker redelivers them to this session)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()  # subscriptions stay: the persistent session keeps queueing
        with self._cond:
            self._cond.notify_all()
        thread.join(timeout)
        self._thread = None

    # -- arrival (link's handler threads) --------------------------------------------------------
    def _on_message(self, message: Any) -> None:
        try:
            channel, _device, item = decode(message.topic, message.payload)
        except Malformed as exc:
            with self._cond:
                self._c["received"] += 1
                self._c["malformed"] += 1
            self._bad.warning("ingest: dropped a malformed message: %s", exc)
            self._ack([message])
            return
        pending = _Pending(channel, item, message, time.monotonic(), message.topic)
        with self._cond:
            self._c["received"] += 1
            self._pending.append(pending)
            if len(self._pending) >= self.batch_max:
                self._cond.notify()

    def _on_batch(self, publishes: list[tuple[str, bytes, int]]) -> None:
        """Every message of one read from an :class:`IngestLink`: decoded, then queued under one lock."""
        now = time.monotonic()
        good: list[_Pending] = []
        bad: list[int] = []
        for topic, payload, token in publishes:
            try:
                channel, _device, item = decode(topic, payload)
            except Malformed as exc:
                bad.append(token)
                self._bad.warning("ingest: dropped a malformed message: %s", exc)
                continue
            good.append(_Pending(channel, item, token, now, topic))
        with self._cond:
            self._c["received"] += len(publishes)
            self._c["malformed"] += len(bad)
            self._pending.extend(good)
            if len(self._pending) >= self.batch_max:
                self._cond.notify()
        if bad:
            self._ack(bad)

    def _ack(self, messages: list) -> None:
        ack = getattr(self.link, "ack", None)
        if ack is not None:
            n = ack(messages)
            with self._cond:
                self._c["acked"] += n

    # -- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                if not self._pending:
                    self._cond.wait(0.5)
                    continue
                wait = self._pending[0].arrived + self.flush_s - time.monotonic()
                if len(self._pending) < self.batch_max and wait > 0:
                    self._cond.wait(wait)
                    continue
                chunk = self._take(self.batch_max)
            if not self._write_until_done(chunk):
                return
        # Stopping: one last pass over what is pending now (later arrivals stay unacked).
        with self._cond:
            left = len(self._pending)
        while left > 0:
            with self._cond:
                chunk = self._take(min(self.batch_max, left))
            left -= len(chunk)
            if not chunk or not self._write_once(chunk):
                return

    def _take(self, n: int) -> list[_Pending]:
        """Pop up to ``n`` pending messages (caller holds the lock); they count as waiting until written."""
        n = min(n, len(self._pending))
        self._in_write += n
        return [self._pending.popleft() for _ in range(n)]

    def _put_back(self, chunk: list[_Pending]) -> None:
        with self._cond:
            self._pending.extendleft(reversed(chunk))
            self._in_write -= len(chunk)

    def _write_once(self, chunk: list[_Pending]) -> bool:
        try:
            self._write(chunk)
            return True
        except StoreUnavailableError as exc:
            log.warning("ingest: stopping with %d message(s) unwritten (the broker redelivers them): %s",
                        len(chunk), exc)
            self._put_back(chunk)
            return False

    def _write_until_done(self, chunk: list[_Pending]) -> bool:
        """Write ``chunk``, retrying with backoff while the database is unavailable. False if
        stopped before it could be written."""
        attempt = 0
        while True:
            try:
                self._write(chunk)
                if self._db_down_since is not None:
                    log.warning("ingest: database available again after %.1fs", time.time() - self._db_down_since)
                self._db_error = None
                self._db_down_since = None
                return True
            except StoreUnavailableError as exc:
                with self._cond:
                    self._c["db_errors"] += 1
                    self._db_error = str(exc)
                    if self._db_down_since is None:
                        self._db_down_since = time.time()
                    waiting = len(self._pending) + self._in_write
                self._dbwarn.warning("ingest: %s", self._problem_text(waiting))
            delay = min(self.backoff[1], self.backoff[0] * 2 ** min(attempt, 30))
            attempt += 1
            if self._stopping.wait(delay):
                self._put_back(chunk)  # stopping with the database down: they stay unacknowledged
                return False

    def _write(self, chunk: list[_Pending]) -> None:
        """Write one chunk; a non-availability failure is bisected down to the refused message."""
        batch = IngestBatch()
        statuses, telemetry, events = batch.statuses, batch.telemetry, batch.events
        for p in chunk:
            if p.channel == "telemetry":
                telemetry.append(p.item)
            elif p.channel == "events":
                events.append(p.item)
            elif p.item is not None:
                statuses.append((p.item["device_id"], p.item))
        started = time.monotonic()
        self._writing_since = started
        try:
            result = self.store.write_batch(batch)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad row must not wedge ingest
            if len(chunk) > 1:
                half = len(chunk) // 2
                self._write(chunk[:half])
                self._write(chunk[half:])
                return
            with self._cond:
                self._c["rejected"] += 1
                self._in_write -= 1
            log.error("ingest: the store refused a message on %s, dropped: %s", chunk[0].topic, exc)
            self._ack([p.message for p in chunk])
            return
        finally:
            self._writing_since = None
        elapsed = time.monotonic() - started
        self._ack([p.message for p in chunk])
        now = time.monotonic()
        with self._cond:
            c = self._c
            c["batches"] += 1
            c["messages"] += len(chunk)
            c["telemetry"] += result.inserted_telemetry
            c["events"] += result.inserted_events
            c["statuses"] += result.statuses
            c["duplicates"] += result.duplicates
            c["rejected"] += result.rejected
            self._in_write -= len(chunk)
            self._last_batch_ms = elapsed * 1000
            self._rate.append((now, c["messages"]))

    # -- stats ---------------------------------------------------------------------------------
    def _problem_text(self, waiting: int) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._db_down_since or time.time()))
        return f"database unavailable since {since}: {self._db_error}; {waiting} messages waiting"

    def stats(self) -> dict:
        """Counters and health for /metrics, the API and the dashboard.

        ``messages`` written (incl. duplicates), ``messages_per_s`` over the last ~10 s,
        ``pending`` received but not written, ``lag_s`` age of the oldest of them, ``problem``
        a sentence when something is wrong (None otherwise).
        """
        now = time.monotonic()
        with self._cond:
            out: dict[str, Any] = dict(self._c)
            pending = len(self._pending) + self._in_write
            lag = now - self._pending[0].arrived if self._pending else 0.0
            rate = 0.0
            samples = [s for s in self._rate if now - s[0] <= 10.0]
            if samples:
                first = samples[0]
                span = now - first[0]
                # include the batch that produced the first sample when the window holds one sample
                rate = (out["messages"] - first[1]) / span if span > 0.5 else 0.0
        writing = self._writing_since
        out.update(pending=pending, lag_s=round(lag, 3), messages_per_s=round(rate, 1),
                   last_batch_ms=round(self._last_batch_ms, 1), db_error=self._db_error,
                   db_unavailable_since=self._db_down_since,
                   writing_s=round(now - writing, 3) if writing is not None else 0.0,
                   connected=bool(getattr(self.link, "connected", False)), since=self._started,
                   subscribed=bool(self._tokens) and all(t.wait(0) for t in self._tokens))
        problem = None
        if self._db_down_since is not None:
            problem = self._problem_text(pending)
        elif writing is not None and now - writing > 5.0:
            problem = f"a database write has been running for {now - writing:.0f}s (database locked or slow); " \
                      f"{pending} messages waiting"
        elif not out["connected"]:
            problem = f"not connected to the broker ({getattr(self.link, 'last_error', None) or 'reconnecting'})"
        out["problem"] = problem
        return out


# ----------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class WorkerConfig:
    """What an ingest worker process needs (picklable)."""

    broker_url: str
    db_url: str
    fleet: str
    client_id: str
    share_group: str = "litefleet"
    tls: Any = None                 # agent.mqtt.TlsFiles or None
    batch_max: int = 2000
    flush_ms: int = 200
    receive_maximum: int = 65535
    stats_interval_s: float = 0.25
    username: str | None = None
    password: str | None = None


def worker_main(config: WorkerConfig, conn: Any, index: int) -> None:
    """One ingest process: its own :class:`fleet.ingest_link.IngestLink` (fixed client id,
    persistent session, acks after commit), store and :class:`Ingestor`; sends its stats on
    ``conn`` until SIGTERM.

    Why a pipe per worker and SIGTERM rather than a shared multiprocessing Queue/Event: those
    hold a lock shared by all processes, and a worker SIGKILLed inside it deadlocks the rest.
    """
    import signal

    from fleet.ingest_link import IngestLink
    from fleet.store import open_store
    logging.basicConfig(level=logging.WARNING, format=f"ingest[{index}] %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = open_store(config.db_url)
    # Every message leaves a dozen small dicts and lists alive until its batch is written: with
    # the default threshold (700) the cyclic collector ran many times per batch and rescanned
    # them (~10% of this process's CPU). Nothing here makes cycles that need it quickly.
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)
    link = IngestLink(config.broker_url, config.client_id, tls=config.tls, username=config.username,
                      password=config.password, clean_start=False, receive_maximum=config.receive_maximum,
                      backoff=(0.2, 5.0))
    ingestor = Ingestor(link, store, config.fleet, share_group=config.share_group,
                        batch_max=config.batch_max, flush_ms=config.flush_ms)
    ingestor.start()
    link.start()
    try:
        while not stop.wait(config.stats_interval_s):
            try:
                conn.send(ingestor.stats())
            except OSError:   # the parent is gone
                break
    finally:
        ingestor.stop()      # writes and acks what is pending; later arrivals stay unacked
        link.stop()
        try:
            conn.send(ingestor.stats())
        except OSError:
            pass
        store.close()


class IngestWorkers:
    """N ingest processes sharing one subscription group; a dead one is restarted under the
    same client id (so the broker delivers the share it queued for that session)."""

    def __init__(self, n: int, broker_url: str, db_url: str, fleet: str, *, client_id_prefix: str = "litefleet-ingest",
                 share_group: str = "litefleet", tls: Any = None, batch_max: int = 2000, flush_ms: int = 200,
                 restart: bool = True) -> None:
        if n < 1:
            raise ValueError("at least one ingest worker is needed")
        self.configs = [WorkerConfig(broker_url, db_url, fleet, f"{client_id_prefix}-{i}", share_group, tls,
                                     batch_max, flush_ms) for i in range(n)]
        self.restart = restart
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = [None] * n
        self._conns: list[Any] = [None] * n
        self._latest: dict[int, dict] = {}
        self._base: dict[int, dict] = {}     # counters of earlier incarnations of worker i
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def _spawn(self, i: int) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=worker_main, args=(self.configs[i], writer, i),
                                 name=f"litefleet-ingest-{i}", daemon=True)
        proc.start()
        writer.close()
        self._procs[i] = proc
        self._conns[i] = reader

    def start(self) -> "IngestWorkers":
        for i in range(len(self.configs)):
            self._spawn(i)
        self._thread = threading.Thread(target=self._watch, name="ingest-workers", daemon=True)
        self._thread.start()
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _drain(self, timeout: float) -> None:
        from multiprocessing.connection import wait
        conns = [c for c in self._conns if c is not None]
        for conn in wait(conns, timeout) if conns else []:
            i = self._conns.index(conn)
            try:
                while conn.poll():
                    stats = conn.recv()
                    with self._lock:
                        self._latest[i] = stats
            except (EOFError, OSError):
                conn.close()
                self._conns[i] = None

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._drain(0.2)
            for i, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and not self._stopping.is_set() and self.restart:
                    log.warning("ingest worker %d (pid %s) exited with %s; restarting it as %s", i, proc.pid,
                                proc.exitcode, self.configs[i].client_id)
                    self._drain(0)
                    with self._lock:
                        last = self._latest.pop(i, {})
                        base = self._base.setdefault(i, {})
                        for k, v in last.items():
                            if isinstance(v, int) and not isinstance(v, bool) and k != "pending":
                                base[k] = base.get(k, 0) + v
                        self.restarts += 1
                    if self._conns[i] is not None:
                        self._conns[i].close()
                        self._conns[i] = None
                    self._spawn(i)

    def stats(self) -> dict:
        """The workers' stats summed (counters, rates, pending); ``problem`` joined; ``workers``."""
        with self._lock:
            latest = dict(self._latest)
            base = {i: dict(b) for i, b in self._base.items()}
        total: dict[str, Any] = {}
        problems = []
        for i in range(len(self.configs)):
            s = latest.get(i, {})
            for k, v in list(s.items()) + list(base.get(i, {}).items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("since", "db_unavailable_since"):
                    total[k] = total.get(k, 0) + v
            if s.get("problem"):
                problems.append(f"worker {i}: {s['problem']}")
        total["lag_s"] = max((s.get("lag_s", 0.0) for s in latest.values()), default=0.0)
        total["workers"] = len(self.configs)
        total["workers_alive"] = sum(1 for p in self._procs if p is not None and p.is_alive())
        total["restarts"] = self.restarts
        total["problem"] = "; ".join(problems) or None
        total["connected"] = all(s.get("connected") for s in latest.values()) if latest else False
        total["subscribed"] = sum(1 for s in latest.values() if s.get("subscribed"))
        return total

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (each writes what it holds), wait, SIGKILL stragglers."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        self._drain(0)
        for c in self._conns:
            if c is not None:
                c.close()


def run_workers(n: int, broker_url: str, db_url: str, fleet: str, **kwargs: Any) -> IngestWorkers:
    """Start ``n`` ingest processes (see :class:`IngestWorkers`); ``stop()`` them when done."""
    return IngestWorkers(n, broker_url, db_url, fleet, **kwargs).start()


__all__ = ["CHANNELS", "Ingestor", "IngestWorkers", "Malformed", "WorkerConfig", "decode", "run_workers",
           "worker_main"]
