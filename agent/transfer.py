"""Pulling a model over MQTT: chunked, verified against the signed manifest, resumable.

The split (as in python-tuf's ngclient): :class:`TransferPlan` decides, with time passed in,
which chunks to ask for and when to ask again; :class:`DownloadState` is the on-disk edge;
:class:`Downloader` moves bytes between the MQTT link, the plan and the state.

Order of trust: nothing from the broker is believed until checked. The head (manifest and its
detached signature) is verified with :meth:`Installer.check_manifest` and the device's
capacity with :meth:`Installer.precheck` before a single chunk is asked for; every chunk is
checked against its sha256 in the signed manifest before it is written. The whole model's
sha256 is the installer's check (:func:`agent.protocol.manifest.check_model`), made once, at
install: here it would only hash the same verified chunks a second time.

A blob is named by its id, the sha256 of its signed ``manifest.json`` bytes
(:func:`agent.protocol.bundle.blob_id`): a head is taken only if its manifest hashes to the
requested id, so no other manifest (another profile's, or a rogue's validly signed older one)
can stand in for the one the deploy command named.

Sharing the blob's stream: the fetch subscribes to it and waits for the broker's SUBACK before
its first request, so every copy the repository publishes after that request reaches it. Its
first request asks for the head: that tells the repository the device subscribed anew. So does
its first chunk request after a reconnect that lost the session, or when it did not ask for the
head (it was on disk, or came retained first) and the broker did not keep its session.

Download state lives in ``<state_dir>/downloads/<blob id>/`` (``manifest.json``,
``manifest.sig``, a preallocated ``model.part``). Which chunks are present is found by hashing
``model.part``'s chunks against the signed manifest on resume: no bitmap to keep consistent,
and a torn write after a power cut simply shows up as a missing chunk. A finished fetch hands
the model over as a read-only memory map of ``model.part``: the chunks just written are in the
page cache, so nothing is read back or copied.

Errors: head refusals raise :class:`~agent.errors.InstallError` with the installer's code
(``bad_signature``, ``not_newer``, ``no_space`` ...: fetching again will not help); a transfer
that cannot finish raises :class:`TransferError` (retrying later may help). Events: only
``DEPLOY_PROGRESS`` (head verified, 25% steps, rejected chunks); the caller reports the outcome.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import events as ev
from agent.errors import AgentError, InstallError
from agent.events import Event, EventSink, discard
from agent.protocol import messages
from agent.protocol.bundle import blob_id as manifest_blob_id
from agent.protocol.keys import atomic_write
from agent.protocol.manifest import Manifest, ModelData
from agent.protocol.topics import Topics

log = logging.getLogger("litefleet.transfer")

DEFAULT_WINDOW = 16                        # chunks in flight, capped by DEFAULT_MAX_INFLIGHT_BYTES
DEFAULT_MAX_INFLIGHT_BYTES = 4 * 1024 * 1024   # window x chunk size stays under this: 4 of the default 1 MiB
                                               # chunks, 16 of 256 KiB (docs/benchmarks-mqtt.md)
DEFAULT_TIMEOUT_S = 60.0                   # give up when nothing useful arrived for this long
PROGRESS_STEP = 25                         # percent between DEPLOY_PROGRESS events
MAX_CHUNK_EVENTS = 10                      # rejected-chunk events per fetch (then only counted)
_POLL_S = 0.25                             # longest wait before re-checking cancel and connection
# Bytes an MQTT PUBLISH adds around a chunk message besides the topic: fixed header (<= 5),
# topic length (2), packet id (2), MQTT 5 properties (message expiry: <= 10).
_PUBLISH_OVERHEAD = 19


class TransferError(AgentError):
    """A model could not be fetched; retrying later may help. ``code``: ``no_answer``,
    ``stalled``, ``packet_too_large``, ``cancelled``, ``disk``, ``bad_blob``, ``not_authorized``."""

    def __init__(self, code: str, message: str, *, blob: str = "", missing: int = 0) -> None:
        self.code = code
        self.blob = blob
        self.missing = missing
        super().__init__(message)


# --- pure decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for an answer before asking again: doubling per attempt, capped, with
    jitter so that devices which lost the same message do not all ask again at the same instant.

    The repository merges a device's first repeat with the copy it believes on its way (the
    device is usually slow, not robbed) and serves the second, so a lost chunk costs two waits.
    """

    base_s: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.5

    def timeout(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after the ``attempt``-th request (1-based): [c, c*(1+jitter)]."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(max(attempt - 1, 0), 30))
        return ceiling * (1.0 + rng.uniform(0.0, self.jitter))


@dataclass
class _Flight:
    sent_at: float
    attempts: int
    due: float
    urgent: bool = False   # ask again at ``due`` even while other chunks arrive (a bad copy, a reconnect)


class TransferPlan:
    """Which chunks are present, which are in flight, what to ask for next. No I/O; time is passed in.

    Chunks arriving unasked (another device's request on the shared stream) are welcome: any
    missing chunk that verifies is taken, and frees a slot of the window if it was in flight.

    A chunk whose wait ran out is asked for again only once no new chunk has arrived for the
    first retry wait (``retry.base_s``): while the stream keeps delivering, what we asked for is
    queued behind what arrives (a busy broker or a busy device), and asking again would only
    make the repository publish another copy to every device on the stream.
    """

    def __init__(self, count: int, *, now: float, present: Iterable[int] = (), window: int = DEFAULT_WINDOW,
                 retry: RetryPolicy = RetryPolicy(), stall_timeout_s: float = DEFAULT_TIMEOUT_S,
                 min_rerequest_s: float = 0.25, rng: random.Random | None = None) -> None:
        if count < 1:
            raise ValueError(f"a blob has at least one chunk, got {count}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.count = count
        self.window = window
        self.retry = retry
        self.stall_timeout_s = stall_timeout_s
        self.min_rerequest_s = min_rerequest_s
        self.rng = rng or random.Random()
        self.present: set[int] = {i for i in present if 0 <= i < count}
        self.inflight: dict[int, _Flight] = {}
        self.last_progress = now
        self.requests_sent = 0   # chunk requests, counting each chunk of each request
        self.rerequests = 0      # of which repeats
        self.rejected_count = 0

    # state ---------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return len(self.present) == self.count

    @property
    def done(self) -> int:
        return len(self.present)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.present]

    def percent(self) -> int:
        return self.done * 100 // self.count

    # decisions -----------------------------------------------------------------------------------
    def next_requests(self, now: float) -> list[int]:
        """Chunks to ask for now: in-flight ones whose wait ran out, then new ones up to the window.
        They are recorded as requested at ``now``."""
        out = []
        quiet = now - self.last_progress >= self.retry.base_s
        for index, flight in self.inflight.items():
            if flight.due <= now and (flight.urgent or quiet):
                flight.attempts += 1
                flight.sent_at = now
                flight.due = now + self.retry.timeout(flight.attempts, self.rng)
                flight.urgent = False
                self.rerequests += 1
                out.append(index)
        room = self.window - len(self.inflight)
        if room > 0:
            for index in range(self.count):
                if room == 0:
                    break
                if index in self.present or index in self.inflight:
                    continue
                self.inflight[index] = _Flight(now, 1, now + self.retry.timeout(1, self.rng))
                out.append(index)
                room -= 1
        self.requests_sent += len(out)
        return sorted(out)

    def received(self, index: int, now: float) -> bool:
        """A verified chunk arrived; True when it was new (progress)."""
        if not 0 <= index < self.count or index in self.present:
            return False
        self.present.add(index)
        self.inflight.pop(index, None)
        self.last_progress = now
        return True

    def rejected(self, index: int, now: float) -> None:
        """A chunk failed its sha256: ask again soon if we were waiting for it (not in a burst)."""
        self.rejected_count += 1
        flight = self.inflight.get(index)
        if flight is not None:
            flight.due = min(flight.due, max(now, flight.sent_at + self.min_rerequest_s))
            flight.urgent = True

    def reconnected(self, now: float) -> None:
        """The link came back: what was in flight may have died with the old connection."""
        for flight in self.inflight.values():
            flight.due = now
            flight.urgent = True

    def expired(self, now: float) -> bool:
        return not self.complete and now - self.last_progress >= self.stall_timeout_s

    def next_wakeup(self, now: float) -> float:
        """When the plan next has something to do if nothing arrives."""
        times = [self.last_progress + self.stall_timeout_s]
        quiet_at = self.last_progress + self.retry.base_s
        times += [f.due if f.urgent else max(f.due, quiet_at) for f in self.inflight.values()]
        if len(self.inflight) < self.window and len(self.present) + len(self.inflight) < self.count:
            times.append(now)
        return min(times)


def progress_step(percent: int, last_step: int, step: int = PROGRESS_STEP) -> int | None:
    """The highest step boundary crossed since ``last_step`` (e.g. 50 when going 24% -> 57%), or None."""
    reached = percent // step * step
    return reached if reached > last_step else None


def max_window(chunk_size: int, requested: int, max_inflight_bytes: int) -> int:
    """The window actually used: at most ``requested`` and at most what fits ``max_inflight_bytes``."""
    return max(1, min(requested, max_inflight_bytes // max(chunk_size, 1)))


def chunk_message_size(chunk_size: int, topic: str) -> int:
    """The largest PUBLISH packet a chunk of this size becomes on ``topic``."""
    return messages.HEADER_SIZE + chunk_size + len(topic.encode()) + _PUBLISH_OVERHEAD


# --- the disk edge ------------------------------------------------------------------------------


class DownloadState:
    """A partial download on disk; survives agent restarts, power cuts and broker restarts."""

    MANIFEST = "manifest.json"
    SIGNATURE = "manifest.sig"
    PART = "model.part"

    def __init__(self, downloads_dir: Path, blob_id: str) -> None:
        self.dir = Path(downloads_dir) / blob_id
        self.part_path = self.dir / self.PART
        self._fd: int | None = None
        self._chunk_size = 0
        self._size = 0

    def load_head(self) -> tuple[bytes, bytes] | None:
        try:
            return (self.dir / self.MANIFEST).read_bytes(), (self.dir / self.SIGNATURE).read_bytes()
        except FileNotFoundError:
            return None

    def save_head(self, manifest_bytes: bytes, signature_bytes: bytes) -> None:
        """Keep the verified head for a resumed fetch. Written whole (rename), not fsynced: a head
        lost or torn by a power cut fails its check on resume and is simply fetched again."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / self.SIGNATURE, signature_bytes, durable=False)
        atomic_write(self.dir / self.MANIFEST, manifest_bytes, durable=False)

    def open(self, manifest: Manifest) -> set[int]:
        """Open (or preallocate) ``model.part``; return the chunks already in it that verify."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chunk_size = manifest.chunk_size
        self._size = manifest.size
        fresh = not self.part_path.exists() or self.part_path.stat().st_size != manifest.size
        self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        if fresh:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, manifest.size)
            return set()
        present = set()
        for index, expected in enumerate(manifest.chunks):
            start = index * manifest.chunk_size
            data = os.pread(self._fd, min(manifest.chunk_size, manifest.size - start), start)
            if hashlib.sha256(data).hexdigest() == expected:
                present.add(index)
        return present

    def write_chunk(self, index: int, data: bytes) -> None:
        assert self._fd is not None, "open() first"
        os.pwrite(self._fd, data, index * self._chunk_size)

    def model(self) -> ModelData:
        """The assembled model: a read-only map of ``model.part``, valid after :meth:`close` and
        :meth:`discard` (the mapping keeps the file's pages). No fsync: the install stages its
        own durable copy, and a resumed download re-hashes every chunk on disk, so a torn write
        here only costs a re-request."""
        assert self._fd is not None, "open() first"
        if not self._size:
            return b""
        return mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the orchestrator ----------------------------------------------------------------------------


class Downloader:
    """Fetches blobs over an MQTT link (``agent.mqtt.MqttLink`` or anything with its methods).

    ``fetch`` blocks the calling thread; the link's handler only queues messages.
    """

    def __init__(self, link: Any, topics: Topics, device_id: str, state_dir: str | os.PathLike[str],
                 installer: Any, events: EventSink = discard, *, retry: RetryPolicy = RetryPolicy(),
                 max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.link = link
        self.topics = topics
        self.device_id = device_id
        self.downloads_dir = Path(state_dir) / "downloads"
        self.installer = installer
        self.events = events
        self.retry = retry
        self.max_inflight_bytes = max_inflight_bytes
        self._clock = clock
        self._rng = rng or random.Random()
        self._cancel = threading.Event()
        self.last_plan: TransferPlan | None = None   # for status and tests
        self._request_topic = str(topics.chunk_requests(device_id))

    def cancel(self) -> None:
        """Make a running ``fetch`` stop soon with TransferError('cancelled'); its state stays on disk."""
        self._cancel.set()

    def discard(self, blob_id: str) -> None:
        """Delete a download's state (after the install, or when its manifest was refused)."""
        try:
            self.topics.blob_chunks(blob_id)  # a blob id is lowercase hex: never a path to delete
        except ValueError:
            return
        DownloadState(self.downloads_dir, blob_id).discard()

    def fetch(self, blob_id: str, *, window: int = DEFAULT_WINDOW,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bytes, bytes, ModelData]:
        """Fetch blob ``blob_id`` (the sha256 of its signed manifest); return (manifest bytes,
        signature bytes, model): the manifest's signature and every chunk verified. The model is
        a read-only map of the downloaded file (no copy; ``bytes(model)`` for a copy); its whole
        sha256 is checked at install.

        ``timeout_s``: give up when nothing useful (a valid head or a new valid chunk) arrived
        for that long. Resumes from any state a previous fetch left on disk.
        """
        try:
            stream = str(self.topics.blob_chunks(blob_id))
        except ValueError as exc:
            raise TransferError("bad_blob", str(exc), blob=str(blob_id)) from None
        self._cancel.clear()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Before any request, and no request before the broker's SUBACK: the repository merges our
        # asks with copies it publishes after them, which must reach us.
        # ``inline``: the handler only queues, so it runs on the network thread, saving a thread
        # switch per chunk (measured: a local 15 MB pull 3-9% faster).
        subscription = self.link.subscribe(stream, inbox.put, qos=1, inline=True)
        state = DownloadState(self.downloads_dir, blob_id)
        try:
            manifest_bytes, signature_bytes, manifest, asked = self._head(blob_id, state, inbox, timeout_s,
                                                                          subscription)
            try:
                self.installer.precheck(manifest)
            except InstallError:
                state.discard()
                raise
            self._check_packet_size(blob_id, manifest, stream)
            try:
                present = state.open(manifest)
            except OSError as exc:
                raise TransferError("disk", f"cannot prepare {state.part_path} for blob {blob_id}: {exc}",
                                    blob=blob_id) from None
            plan = TransferPlan(len(manifest.chunks), now=self._clock(), present=present,
                                window=max_window(manifest.chunk_size, window, self.max_inflight_bytes),
                                retry=self.retry, stall_timeout_s=timeout_s, rng=self._rng)
            self.last_plan = plan
            self._emit(blob_id, manifest, plan, "head_verified",
                       f"{manifest.name} v{manifest.version}: manifest verified, "
                       + (f"resuming with {plan.done} of {plan.count} chunks on disk" if plan.done
                          else f"fetching {plan.count} chunks of {manifest.chunk_size} bytes")
                       + f" (window {plan.window})")
            # Not asked for the head (it was on disk, or came retained first): say we subscribed anew,
            # unless the broker kept our session, whose queue holds what was on its way to us. Not yet
            # connected (an agent resuming at start): _pull decides when the CONNACK says which it is.
            session = getattr(getattr(self.link, "connect_info", None), "session_present", False)
            announce = not asked and bool(self.link.connected) and not session
            self._pull(blob_id, manifest, plan, state, inbox, subscription, announce=announce)
            return manifest_bytes, signature_bytes, state.model()
        finally:
            state.close()
            try:
                self.link.unsubscribe(stream)
            except Exception as exc:  # the link may be stopping; the fetch's outcome matters more
                log.debug("unsubscribe %s failed: %s", stream, exc)

    # steps ------------------------------------------------------------------------------------------
    def _head(self, blob: str, state: DownloadState, inbox: queue.SimpleQueue,
              timeout_s: float, subscription: Any) -> tuple[bytes, bytes, Manifest, bool]:
        """The verified head, and whether we asked for it (not when it was on disk, or came retained
        before our request)."""
        stored = state.load_head()
        if stored is not None:
            try:
                manifest = self._verify_head(blob, *stored)
            except InstallError:
                state.discard()
                raise
            if manifest is not None:
                return stored[0], stored[1], manifest, False
            state.discard()
        start = self._clock()
        due = start
        attempts = 0
        was_connected = False
        while True:
            self._check_cancel(blob, None)
            now = self._clock()
            connected = bool(self.link.connected)
            if connected and not was_connected:
                due = now
            was_connected = connected
            if connected and now >= due and self._subscribed(blob, subscription, now + _POLL_S):
                attempts += 1
                self._request(blob, True, [])
                due = now + self.retry.timeout(attempts, self._rng)
            if now - start >= timeout_s:
                where = "" if connected else f" (not connected to the broker: {getattr(self.link, 'last_error', '')})"
                raise TransferError("no_answer", f"repository did not answer for blob {blob}: no manifest after "
                                                 f"{timeout_s:g}s and {attempts} request(s){where}; is the "
                                                 f"repository service running, and does it hold this blob?",
                                    blob=blob)
            if not connected:
                # Ask before taking anything, even the retained head that comes with the SUBACK:
                # the request is what tells the repository another device joins this stream.
                self._wait_connected(min(now + _POLL_S, start + timeout_s) - now)
                continue
            message = _get(inbox, min(due, start + timeout_s) - now)
            if message is None:
                continue
            try:
                chunk = messages.decode_chunk(message.payload, message.topic)
                if chunk.kind != messages.KIND_HEAD:
                    continue  # chunks cannot be checked before the manifest: drop
                manifest_bytes, signature_bytes = messages.split_head(chunk, message.topic)
            except messages.MessageError as exc:
                log.warning("ignored a malformed message on %s: %s", message.topic, exc)
                continue
            manifest = self._verify_head(blob, manifest_bytes, signature_bytes)
            if manifest is None:
                continue
            state.save_head(manifest_bytes, signature_bytes)
            return manifest_bytes, signature_bytes, manifest, attempts > 0

    def _verify_head(self, blob: str, manifest_bytes: bytes, signature_bytes: bytes) -> Manifest | None:
        """The verified manifest; None for a head that is not blob ``blob``'s (ignored); InstallError if refused.

        The blob id is the manifest's hash, so only the one manifest the deploy command named is
        accepted: another validly signed one (another profile's, an older version's, replayed by
        whoever may publish on the stream) is ignored before its signature is even checked.
        """
        actual = manifest_blob_id(manifest_bytes)
        if actual != blob:
            log.warning("ignored a head on blob/%s whose manifest hashes to %s", blob, actual)
            return None
        return self.installer.check_manifest(manifest_bytes, signature_bytes)

    def _check_packet_size(self, blob: str, manifest: Manifest, stream: str) -> None:
        limit = getattr(self.link, "max_packet_size", None)
        if not limit:
            return
        needed = chunk_message_size(manifest.chunk_size, stream)
        if needed > limit:
            raise TransferError("packet_too_large",
                                f"blob {blob} comes in {manifest.chunk_size}-byte chunks, i.e. {needed}-byte MQTT "
                                f"messages, but the broker announced a maximum packet size of {limit} bytes; "
                                f"rebuild the bundle with a smaller chunk size or raise the broker's "
                                f"max_packet_size", blob=blob, missing=len(manifest.chunks))

    def _pull(self, blob: str, manifest: Manifest, plan: TransferPlan, state: DownloadState,
              inbox: queue.SimpleQueue, subscription: Any, *, announce: bool) -> None:
        """Ask for chunks until every one is on disk. ``announce``: the next request also asks for
        the head, which tells the repository we subscribed anew, so that it forgets what it thought
        was on its way to us (a resumed fetch, a reconnect that lost the session)."""
        step = progress_step(plan.percent(), -1) or 0
        was_connected = bool(self.link.connected)
        message = _get(inbox, 0.0)
        while True:
            self._check_cancel(blob, plan)
            # Take everything that arrived before deciding anything: a loop that was starved of
            # CPU must not ask again for chunks already waiting in its inbox.
            while message is not None:
                self._take(blob, message, manifest, plan, state)
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    message = None
            reached = progress_step(plan.percent(), step)
            if reached is not None:
                step = reached
                self._emit(blob, manifest, plan, "progress",
                           f"{manifest.name} v{manifest.version}: {plan.done} of {plan.count} chunks ({reached}%)",
                           milestone=reached)
            if plan.complete:
                return
            now = self._clock()
            connected = bool(self.link.connected)
            if connected and not was_connected:
                plan.reconnected(now)
                info = getattr(self.link, "connect_info", None)
                announce = announce or not getattr(info, "session_present", False)
            was_connected = connected
            if connected and self._subscribed(blob, subscription, now + _POLL_S):
                now = self._clock()
                wanted = plan.next_requests(now)
                if wanted or announce:
                    self._request(blob, announce, wanted)
                    announce = False
            if plan.expired(now):
                missing = plan.count - plan.done
                raise TransferError("stalled", f"blob {blob}: {missing} of {plan.count} chunks still missing after "
                                               f"{plan.stall_timeout_s:g}s without progress "
                                               f"({'connected' if connected else 'not connected'} to the broker); "
                                               f"the download state is kept and the next fetch resumes it",
                                    blob=blob, missing=missing)
            if connected:
                message = _get(inbox, plan.next_wakeup(now) - now)
            else:
                self._wait_connected(_POLL_S)
                message = _get(inbox, 0.0)

    def _take(self, blob: str, message: Any, manifest: Manifest, plan: TransferPlan, state: DownloadState) -> None:
        try:
            chunk = messages.decode_chunk(message.payload, message.topic)
        except messages.MessageError as exc:
            log.warning("ignored a malformed message on %s: %s", message.topic, exc)
            return
        index = chunk.index
        if chunk.kind != messages.KIND_CHUNK or chunk.count != plan.count or index in plan.present:
            return  # a head, another layout, or a copy of what we have: cheap to ignore
        if hashlib.sha256(chunk.payload).hexdigest() != manifest.chunks[index]:
            plan.rejected(index, self._clock())
            reason = f"chunk {index} of {manifest.name} v{manifest.version} failed its sha256, re-requesting"
            log.warning("%s (blob %s)", reason, blob)
            if plan.rejected_count <= MAX_CHUNK_EVENTS:
                self._emit(blob, manifest, plan, "chunk_rejected", reason, chunk=index)
            return
        try:
            state.write_chunk(index, chunk.payload)
        except OSError as exc:
            raise TransferError("disk", f"cannot write chunk {index} of blob {blob} to "
                                        f"{state.part_path}: {exc}", blob=blob,
                                missing=plan.count - plan.done) from None
        plan.received(index, self._clock())

    def _wait_connected(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the link to (re)connect: a link that opens its connection
        for the fetch (agent.blob_link) is usually up a few ms later."""
        wait = getattr(self.link, "wait_connected", None)
        if wait is not None:
            wait(max(0.0, timeout))
        else:
            self._cancel.wait(max(0.0, timeout))

    def _subscribed(self, blob: str, subscription: Any, until: float) -> bool:
        """Whether the broker acknowledged our subscription to the blob's stream on this connection,
        waiting for its SUBACK until ``until`` at most. A refusal ends the fetch."""
        wait = getattr(subscription, "wait", None)
        if wait is None:  # a link without subscription tokens: in-order delivery is all we have
            return True
        if wait(max(0.0, until - self._clock())):
            return True
        refused = getattr(subscription, "refused", None)
        if refused:
            raise TransferError("not_authorized", f"the broker refused our subscription to blob {blob}'s chunk "
                                                  f"stream ({refused}); check the broker's ACL for this device",
                                blob=blob)
        return False

    def _request(self, blob: str, head: bool, chunks: list[int]) -> None:
        payload = messages.encode({"v": messages.MESSAGE_VERSION, "device_id": self.device_id, "blob": blob,
                                   "head": head, "chunks": chunks})
        try:
            self.link.publish(self._request_topic, payload, qos=1)
        except Exception as exc:  # the retry timer asks again; the stall deadline bounds it all
            log.warning("could not send a chunk request for blob %s: %s", blob, exc)

    def _check_cancel(self, blob: str, plan: TransferPlan | None) -> None:
        if self._cancel.is_set():
            missing = plan.count - plan.done if plan else 0
            raise TransferError("cancelled", f"fetch of blob {blob} cancelled"
                                + (f" with {missing} of {plan.count} chunks missing; state kept for resuming"
                                   if plan else ""), blob=blob, missing=missing)

    def _emit(self, blob: str, manifest: Manifest, plan: TransferPlan, step: str, reason: str, **extra: Any) -> None:
        details = {"step": step, "blob": blob, "model_sha256": manifest.sha256, "name": manifest.name,
                   "version": manifest.version,
                   "chunks_done": plan.done, "chunks_total": plan.count, "percent": plan.percent(), **extra}
        try:
            self.events(Event(ev.DEPLOY_PROGRESS, reason, details))
        except Exception:
            log.exception("event sink failed on %s", step)


def _get(inbox: queue.SimpleQueue, wait: float) -> Any:
    try:
        return inbox.get(timeout=min(max(wait, 0.0), _POLL_S)) if wait > 0 else inbox.get_nowait()
    except queue.Empty:
        return None


__all__ = ["Downloader", "DownloadState", "TransferPlan", "RetryPolicy", "TransferError", "progress_step",
           "max_window", "chunk_message_size"]
