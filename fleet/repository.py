"""The host's bundle repository: a content-addressed store on disk and the MQTT service that
answers devices' chunk requests.

Store layout, one directory per signed manifest. Its blob id, the name a deploy command
carries, is the sha256 of the ``manifest.json`` bytes (:func:`agent.protocol.bundle.blob_id`),
not the model's: one model file may have several manifests (the same int8 model converted for
two profiles), and each must be served its own head::

    <root>/blobs/<blob id>/manifest.json
                          /manifest.sig
                          /model.tflite

A bundle is verified against the trusted release keys before anything is written, and each
blob directory appears whole or not at all (written beside, then renamed into place).

The service listens to every device's ``chunkreq`` topic and publishes on the blob's ONE
shared stream ``blob/{blob_id}/chunks``, so that 100 devices fetching a model cost one copy of it
on the host's uplink. :class:`ChunkScheduler` decides: a device's request is merged with a copy
already on its way to it (published after the device subscribed), chunks wait a moment while
other devices that asked for the head are still to ask for chunks (gathering), and a device
asking again is first assumed slow rather than robbed. The head (manifest and signature,
signed and small) is published retained, so a device that subscribes just after it went out
still gets it at once instead of waiting out a retry.

A request for a blob the repository does not hold gets no answer (the request is logged and
counted as ``unknown``): nothing a device receives unsigned may change what it does, so the
device's own deadline ends the transfer with "repository did not answer for blob X".
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol import bundle as bundle_mod
from agent.protocol import messages
from agent.protocol.errors import BundleError, LitefleetError
from agent.protocol.keys import PublicKey
from agent.protocol.manifest import MODEL_FILENAME, Manifest
from agent.protocol.topics import Topics, parse

log = logging.getLogger("litefleet.repository")

HEAD = -1                      # the ChunkScheduler's key for a blob's head (manifest + signature)
DEFAULT_MERGE_WINDOW_S = 1.0
DEFAULT_GATHER_S = 0.5         # how long after asking for the head a device is waited for (see ChunkScheduler)
DEFAULT_MAX_GATHER_S = 2.0     # the longest any chunk is held for gathering
DEFAULT_SETTLE_S = 0.25        # a hold also lasts until no new device joined for this long (see ChunkScheduler)
DEFAULT_START_S = 0.0          # a new stream's first chunks wait this long for other devices (off; see ChunkScheduler)
CHUNK_EXPIRY_S = 120           # MQTT 5: the broker drops chunks nobody fetched within this time
HEAD_EXPIRY_S = 3600           # MQTT 5: lifetime of a blob's retained head
_RELEASE_POLL_S = 0.25         # the release thread re-reads an injected clock at least this often
MAX_CHUNKS_PER_REQUEST = 1024  # a longer list is a malformed request


class RepositoryError(LitefleetError):
    """The repository cannot store or serve a bundle."""


# --- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBlob:
    """One blob in the store: its verified manifest and where its model lies.

    ``blob_id`` names the blob (the manifest's hash); ``manifest.sha256`` is the model's.
    """

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    model_path: Path

    @property
    def blob_id(self) -> str:
        return bundle_mod.blob_id(self.manifest_bytes)

    @property
    def count(self) -> int:
        return len(self.manifest.chunks)

    def read_chunk(self, index: int) -> bytes:
        """The bytes of chunk ``index`` (read from disk: the page cache keeps hot blobs cheap)."""
        start, length = self._span(index)
        with open(self.model_path, "rb") as handle:
            return os.pread(handle.fileno(), length, start)

    def chunk_message(self, index: int) -> bytearray:
        """Chunk ``index`` as its stream message (:func:`agent.protocol.messages.encode_chunk`), read
        from disk straight in after the header: one copy of the bytes instead of two."""
        start, length = self._span(index)
        header = messages.chunk_header(index, self.count)
        message = bytearray(len(header) + length)
        message[:len(header)] = header
        with open(self.model_path, "rb") as handle:
            got = os.preadv(handle.fileno(), [memoryview(message)[len(header):]], start)
        if got != length:
            raise RepositoryError(f"blob {self.blob_id}: {self.model_path} is shorter than its manifest says "
                                  f"(chunk {index}: {got} of {length} bytes)")
        return message

    def _span(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} is out of range for blob {self.blob_id} ({self.count} chunks)")
        start = index * self.manifest.chunk_size
        return start, min(self.manifest.chunk_size, self.manifest.size - start)


class BlobStore:
    """Content-addressed bundles on disk; only bundles signed by a trusted release key get in."""

    def __init__(self, root: str | os.PathLike[str], trusted: Iterable[PublicKey]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.trusted = list(trusted)

    def add_bundle(self, path: str | os.PathLike[str]) -> StoredBlob:
        """Verify a bundle file (signature, then model hashes) and store it; return the stored blob."""
        parts = bundle_mod.read_bundle(path)
        try:
            verified = bundle_mod.verify(parts, self.trusted)
        except BundleError as exc:
            raise RepositoryError(f"{path}: refused, not stored: {exc}") from None
        return self._write(verified.manifest, parts.manifest_bytes, parts.signature_bytes, parts.model)

    def add_parts(self, manifest_bytes: bytes, signature_bytes: bytes, model: bytes) -> StoredBlob:
        """Like :meth:`add_bundle` for parts already in memory."""
        try:
            verified = bundle_mod.verify(bundle_mod.Bundle(manifest_bytes, signature_bytes, model), self.trusted)
        except BundleError as exc:
            raise RepositoryError(f"bundle refused, not stored: {exc}") from None
        return self._write(verified.manifest, manifest_bytes, signature_bytes, model)

    def _write(self, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes, model: bytes) -> StoredBlob:
        blob = bundle_mod.blob_id(manifest_bytes)
        final = self.blobs_dir / blob
        stored = StoredBlob(manifest, manifest_bytes, signature_bytes, final / MODEL_FILENAME)
        if final.is_dir() and _read(final / bundle_mod.MANIFEST_NAME) == manifest_bytes \
                and _read(final / bundle_mod.SIGNATURE_NAME) == signature_bytes \
                and (final / MODEL_FILENAME).is_file():
            return stored  # already stored, byte for byte (the model is what this manifest signs)
        tmp = self.blobs_dir / f".tmp-{blob[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, data in ((bundle_mod.MANIFEST_NAME, manifest_bytes),
                               (bundle_mod.SIGNATURE_NAME, signature_bytes), (MODEL_FILENAME, model)):
                with open(tmp / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            if final.exists():  # same manifest, another signature (re-signed) or a damaged copy: replace it
                old = self.blobs_dir / f".old-{blob[:16]}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.blobs_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return stored

    def get(self, blob_id: str) -> StoredBlob | None:
        """The stored blob ``blob_id`` (a manifest's sha256), or None when the store does not hold it."""
        if not _is_blob_id(blob_id):
            return None
        directory = self.blobs_dir / blob_id
        manifest_bytes = _read(directory / bundle_mod.MANIFEST_NAME)
        signature_bytes = _read(directory / bundle_mod.SIGNATURE_NAME)
        if manifest_bytes is None or signature_bytes is None or not (directory / MODEL_FILENAME).is_file():
            return None
        try:
            manifest = Manifest.parse(manifest_bytes, str(directory / bundle_mod.MANIFEST_NAME))
        except BundleError as exc:
            log.error("stored blob %s is damaged: %s", blob_id, exc)
            return None
        if bundle_mod.blob_id(manifest_bytes) != blob_id:
            log.error("stored blob %s is damaged: its manifest.json hashes to %s", blob_id,
                      bundle_mod.blob_id(manifest_bytes))
            return None
        return StoredBlob(manifest, manifest_bytes, signature_bytes, directory / MODEL_FILENAME)

    def list(self) -> list[str]:
        """The ids of the stored blobs."""
        return sorted(p.name for p in self.blobs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_blob_id(text: str) -> bool:
    """Lowercase hex sha256: anything else is never a directory name to look up."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- pure decisions --------------------------------------------------------------------------------


@dataclass
class _Hold:
    """Chunks of one blob held for gathering."""

    since: float                                    # when the hold began
    until: float                                    # held at least until then (a new stream's start)
    items: set[int] = field(default_factory=set)


class ChunkScheduler:
    """Which requested items to publish now, so that one copy serves every device fetching a blob.

    Pure (time is passed in). Items are chunk indices, or :data:`HEAD` for the manifest. A device
    subscribes to the blob's stream, and has the broker's SUBACK, before its first request, so
    every copy published after that request reaches it:

    - a device's first ask for a chunk is merged with any copy published after its first
      request for the blob, however long ago; a copy published before that reached a stream the
      device was not on yet, so the chunk is sent again;
    - a device asking *again* for a chunk is usually slow, not robbed: its copy is still queued in
      the broker or in the device (100 devices sharing two cores took over 2 s to drain theirs).
      Its first re-ask is merged with a copy published after its first request in the last
      ``patience_s``; a second re-ask means the copy was lost and is served, unless a copy went
      out in the last ``resend_s``;
    - the head is published retained, so any copy in the last ``head_keep_s`` serves a first ask;
      a re-ask of the head is served unless a copy went out in the last ``resend_s``;
    - a device asking for the head after asking for chunks has subscribed anew (a new fetch, a
      resumed one, or a reconnect that lost its session): what was on its way to it is forgotten
      and its asks count as first asks from then on.

    Gathering: a device that asked for a blob's head asks for its chunks a moment later (once
    it has verified the head). When a device asks for chunks while *other* devices asked for
    the head in the last ``gather_s`` and not yet for chunks, the chunks are held until every
    such device has asked (or stopped being waited for), at most ``max_gather_s`` after the
    first held request, and then go out once for all of them. Without it a fleet receiving one
    deploy command costs a copy per wave of devices a few hundred ms apart, and each copy's
    flood makes the next wave later. A device alone is never held. Held items are merged for
    everyone who asks before they go out; :meth:`release` hands out those whose wait is over.
    Once chunks are held, they also wait until no new device has asked for the head for
    ``settle_s``: devices open their pull connection when the command reaches them, and under
    load their first requests trickle in for a few hundred ms; releasing as soon as the early
    ones had all asked cost a second copy for the stragglers (2.00x for 100 simulated devices).

    ``start_s`` (0, off, by default) also holds the first chunks of a new stream (none of the
    blob's chunks sent in the last ``forget_s``), for devices that start one after another
    rather than together. Every device alone pays it in full: 50 ms is a third of the ~150 ms a
    15 MB pull takes from a local broker (docs/benchmarks-mqtt.md).

    Without a device id (``device=""``) a request is merged only with copies sent in the last
    ``window_s`` seconds.
    """

    def __init__(self, window_s: float = DEFAULT_MERGE_WINDOW_S, *, resend_s: float = 0.25,
                 patience_s: float = 60.0, head_keep_s: float = 1800.0, forget_s: float = 900.0,
                 gather_s: float = DEFAULT_GATHER_S, max_gather_s: float = DEFAULT_MAX_GATHER_S,
                 start_s: float = DEFAULT_START_S, settle_s: float = DEFAULT_SETTLE_S) -> None:
        for name, value in (("merge window", window_s), ("gathering time", gather_s),
                            ("longest gathering", max_gather_s), ("start hold", start_s), ("settling time", settle_s)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        self.window_s = window_s
        self.resend_s = resend_s
        self.patience_s = patience_s
        self.head_keep_s = head_keep_s
        self.forget_s = max(forget_s, window_s, patience_s)
        self.gather_s = gather_s
        self.max_gather_s = max_gather_s
        self.start_s = min(start_s, max_gather_s)
        self.settle_s = settle_s
        self._sent: dict[str, dict[int, float]] = {}
        # (blob, device) -> (its first request, how often it asked for each item)
        self._asked: dict[tuple[str, str], tuple[float, dict[int, int]]] = {}
        self._joining: dict[str, dict[str, float]] = {}      # blob -> device -> its head ask, no chunk ask yet
        self._last_join: dict[str, float] = {}               # blob -> the latest first head ask of a device
        self._held: dict[str, _Hold] = {}                    # blob -> chunks waiting for more devices
        self._pruned_at = float("-inf")

    def claim(self, blob: str, items: Iterable[int], now: float, device: str = "") -> list[int]:
        """Return the items to publish now (in ascending order) and record them as sent at ``now``.

        Items held for gathering are not returned: they come out of :meth:`claim` (when the last
        device being waited for asks) or :meth:`release` (when the wait is over).
        """
        return self.claim_counted(blob, items, now, device)[0]

    def claim_counted(self, blob: str, items: Iterable[int], now: float, device: str = "") -> tuple[list[int], int]:
        """:meth:`claim`, and how many of the items asked for were merged with a copy sent or held."""
        self._prune(now)
        wanted = set(items)
        sent = self._sent.setdefault(blob, {})
        if device and HEAD in wanted and any(i != HEAD for i in self._asked.get((blob, device), (0, {}))[1]):
            del self._asked[(blob, device)]   # asking for the head again: a new fetch, a new subscription
        first, asked = self._asked.setdefault((blob, device), (now, {})) if device else (now, {})
        held = self._held.get(blob)
        out = [item for item in sorted(wanted)
               if not (held is not None and item in held.items)
               and not self._merge(sent.get(item), item, now, device, first, asked.get(item, 0))]
        merged = len(wanted) - len(out)
        chunks_before = any(i != HEAD for i in asked)
        for item in wanted:
            asked[item] = asked.get(item, 0) + 1
        if device:
            joining = self._joining.setdefault(blob, {})
            if any(i != HEAD for i in wanted):
                joining.pop(device, None)
            elif HEAD in wanted and not chunks_before:
                joining.setdefault(device, now)
                self._last_join[blob] = now
        new_chunks = [i for i in out if i != HEAD]
        if new_chunks and held is None and self.start_s > 0 and not any(i != HEAD for i in sent):
            held = self._held[blob] = _Hold(now, now + self.start_s)   # a new stream: wait a moment for others
        if new_chunks or held is not None:
            if self._waiting(blob, now):
                if held is None:
                    held = self._held[blob] = _Hold(now, now)
                held.items.update(new_chunks)
                out = [i for i in out if i == HEAD]
            elif held is not None:
                out = sorted(set(out) | self._held.pop(blob).items)
        for item in out:
            sent[item] = now
        return out, merged

    def release(self, now: float) -> dict[str, list[int]]:
        """Held chunks whose wait is over, by blob; recorded as sent at ``now``."""
        out = {}
        for blob in [b for b in self._held if not self._waiting(b, now)]:
            items = sorted(self._held.pop(blob).items)
            sent = self._sent.setdefault(blob, {})
            for item in items:
                sent[item] = now
            out[blob] = items
        return out

    def next_release(self) -> float | None:
        """When :meth:`release` next has something to hand out if no request comes; None if nothing is held."""
        times = []
        for blob, hold in self._held.items():
            last_join = max(self._joining.get(blob, {}).values(), default=float("-inf"))
            settled = self._last_join.get(blob, float("-inf")) + self.settle_s
            times.append(min(hold.since + self.max_gather_s, max(hold.until, last_join + self.gather_s, settled)))
        return min(times, default=None)

    def held(self, blob: str) -> list[int]:
        """The chunks of ``blob`` waiting for the devices still joining."""
        entry = self._held.get(blob)
        return sorted(entry.items) if entry else []

    def _waiting(self, blob: str, now: float) -> bool:
        """Whether chunks of ``blob`` wait: the hold is younger than ``max_gather_s`` and either a new
        stream's ``start_s`` is not over, or chunks are held and a device joined in the last
        ``settle_s``, or a device asked for the head lately but not yet for chunks."""
        entry = self._held.get(blob)
        if entry is not None:
            if now - entry.since >= self.max_gather_s:
                return False
            if now < entry.until or now - self._last_join.get(blob, float("-inf")) < self.settle_s:
                return True
        return any(now - at < self.gather_s for at in self._joining.get(blob, {}).values())

    def _merge(self, at: float | None, item: int, now: float, device: str, first: float, asks: int) -> bool:
        """Whether a copy sent at ``at`` serves this ask (``asks``: the device's earlier asks for the item)."""
        if at is None:
            return False
        if not device:
            return now - at < self.window_s
        if item == HEAD:
            return (asks == 0 and now - at < self.head_keep_s) or now - at < self.resend_s
        if asks == 0:
            return at >= first
        return (asks == 1 and at >= first and now - at < self.patience_s) or now - at < self.resend_s

    def recently_sent(self, blob: str, item: int, now: float) -> bool:
        at = self._sent.get(blob, {}).get(item)
        return at is not None and now - at < self.window_s

    def clear(self) -> None:
        """Forget what was sent (after a reconnect: what was 'on its way' may have been lost).
        Held chunks stay held: they have not gone out yet."""
        self._sent.clear()
        self._asked.clear()
        self._joining.clear()
        self._last_join.clear()

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        keep = max(self.forget_s, self.head_keep_s)
        for blob in list(self._sent):
            entries = {i: t for i, t in self._sent[blob].items() if now - t < (keep if i == HEAD else self.forget_s)}
            if entries:
                self._sent[blob] = entries
            else:
                del self._sent[blob]
        self._asked = {k: v for k, v in self._asked.items() if now - v[0] < self.forget_s}
        self._last_join = {b: t for b, t in self._last_join.items()
                           if b in self._held or now - t < max(self.settle_s, self.gather_s)}
        for blob in list(self._joining):
            joiners = {d: t for d, t in self._joining[blob].items() if now - t < self.gather_s}
            if joiners:
                self._joining[blob] = joiners
            else:
                del self._joining[blob]


class Throttle:
    """Allow one thing per key per ``interval_s`` (log lines about one misbehaving device)."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) > 10_000:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval_s}
        self._last[key] = now
        return True


# --- the service ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One chunk request as received: what a device asked for and what was published for it.

    Chunks held for gathering and published when the wait ran out appear as a record of their
    own: outcome ``released``, no device, nothing asked.
    """

    time: float
    device_id: str
    blob: str
    head: bool
    chunks: tuple[int, ...]
    published: tuple[int, ...]   # items published for it (HEAD = -1); the rest were merged or held
    outcome: str                 # "served" | "unknown_blob" | "bad_index" | "released"


class RepositoryService:
    """Answers chunk requests from every device of a fleet on the blobs' shared streams.

    The MQTT link is owned by the caller (``litefleet server`` shares one link among its
    services); ``start()`` subscribes and starts the thread that publishes chunks held for
    gathering (see :class:`ChunkScheduler`) when their wait is over; ``stop()`` undoes both.
    """

    def __init__(self, link: Any, store: BlobStore, fleet: str | Topics, *,
                 merge_window_s: float = DEFAULT_MERGE_WINDOW_S, gather_s: float = DEFAULT_GATHER_S,
                 start_s: float = DEFAULT_START_S, settle_s: float = DEFAULT_SETTLE_S,
                 chunk_expiry_s: int = CHUNK_EXPIRY_S, head_expiry_s: int = HEAD_EXPIRY_S,
                 clock: Callable[[], float] = time.monotonic, log_interval_s: float = 60.0,
                 request_log_size: int = 10_000) -> None:
        self.link = link
        self.store = store
        self.topics = fleet if isinstance(fleet, Topics) else Topics(fleet)
        self.chunk_expiry_s = chunk_expiry_s
        self.head_expiry_s = head_expiry_s
        self._clock = clock
        self._scheduler = ChunkScheduler(merge_window_s, gather_s=gather_s, start_s=start_s, settle_s=settle_s)
        self._throttle = Throttle(log_interval_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)   # a hold began, or stop()
        self._releaser: threading.Thread | None = None
        self._blobs: dict[str, tuple[StoredBlob, int]] = {}   # blob id -> (blob, its directory's inode)
        self._connection: object = None
        self._filter = self.topics.all_devices("chunkreq")
        self._started = False
        self.requests: collections.deque[RequestRecord] = collections.deque(maxlen=request_log_size)
        self._stats = {"requests": 0, "chunks_published": 0, "heads_published": 0, "chunk_bytes": 0,
                       "head_bytes": 0, "merged": 0, "malformed": 0, "unknown_blob": 0, "publish_failed": 0}

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._releaser = threading.Thread(target=self._release_loop, name="repository-release", daemon=True)
            self._releaser.start()
            self.link.subscribe(self._filter, self._on_request, qos=1)

    def stop(self) -> None:
        if self._started:
            self.link.unsubscribe(self._filter)
            with self._wake:
                self._started = False
                self._wake.notify_all()
            if self._releaser is not None:
                self._releaser.join(5)
                self._releaser = None

    # observations --------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Counters; ``bytes_published`` is every chunk and head payload byte sent."""
        with self._lock:
            out = dict(self._stats)
        out["bytes_published"] = out["chunk_bytes"] + out["head_bytes"]
        return out

    def request_log(self, device_id: str | None = None, blob: str | None = None) -> list[RequestRecord]:
        with self._lock:
            records = list(self.requests)
        return [r for r in records if (device_id is None or r.device_id == device_id)
                and (blob is None or r.blob == blob)]

    def forget(self, blob_id: str | None = None) -> None:
        """Drop cached blob lookups (not needed for correctness: see :meth:`_blob`)."""
        with self._lock:
            if blob_id is None:
                self._blobs.clear()
            else:
                self._blobs.pop(blob_id, None)

    # handling ------------------------------------------------------------------------------------
    def _on_request(self, message: Any) -> None:
        now = self._clock()
        topic = parse(message.topic)
        device = topic.name if topic is not None and topic.channel == "chunkreq" else message.topic
        try:
            request = messages.decode(message.payload, "chunkreq", message.topic)
        except messages.MessageError as exc:
            self._malformed(device, str(exc), now)
            return
        if request["device_id"] != device:
            self._malformed(device, f"{message.topic}: device_id {request['device_id']!r} does not match the "
                                    f"topic's device {device!r}", now)
            return
        if len(request["chunks"]) > MAX_CHUNKS_PER_REQUEST:
            self._malformed(device, f"{message.topic}: {len(request['chunks'])} chunks in one request, "
                                    f"over the limit of {MAX_CHUNKS_PER_REQUEST}", now)
            return
        self._serve(device, request["blob"], bool(request["head"]), tuple(request["chunks"]), now)

    def _serve(self, device: str, blob_id: str, head: bool, chunks: tuple[int, ...], now: float) -> None:
        blob = self._blob(blob_id)
        if blob is None:
            with self._lock:
                self._stats["requests"] += 1
                self._stats["unknown_blob"] += 1
                self.requests.append(RequestRecord(now, device, blob_id, head, chunks, (), "unknown_blob"))
            if self._throttle.allow(f"unknown:{device}", now):
                log.warning("device %s asked for blob %s, which this repository does not hold (no answer sent; "
                            "add the bundle with `litefleet server` / BlobStore.add_bundle)", device, blob_id)
            return
        bad = [i for i in chunks if i >= blob.count]
        if bad:
            with self._lock:
                self._stats["requests"] += 1
                self._stats["malformed"] += 1
                self.requests.append(RequestRecord(now, device, blob_id, head, chunks, (), "bad_index"))
            if self._throttle.allow(device, now):
                log.warning("device %s asked for chunk(s) %s of blob %s, which has %d chunks; request dropped",
                            device, bad[:5], blob_id, blob.count)
            return
        self._check_connection()
        wanted = ([HEAD] if head else []) + list(chunks)
        with self._wake:
            to_send, merged = self._scheduler.claim_counted(blob_id, wanted, now, device)
            self._stats["requests"] += 1
            self._stats["merged"] += merged
            self.requests.append(RequestRecord(now, device, blob_id, head, chunks, tuple(to_send), "served"))
            self._wake.notify_all()   # a hold may have begun: the release thread learns its deadline
        self._publish(blob, to_send, now)

    def _release_loop(self) -> None:
        """Publish held chunks when the devices waited for have all asked, or the wait ran out."""
        while True:
            with self._wake:
                if not self._started:
                    return
                now = self._clock()
                due = self._scheduler.next_release()
                if due is None or due > now:
                    self._wake.wait(None if due is None else min(due - now, _RELEASE_POLL_S))
                    continue
                released = self._scheduler.release(now)
                for blob_id, items in released.items():
                    self.requests.append(RequestRecord(now, "", blob_id, False, (), tuple(items), "released"))
            for blob_id, items in released.items():
                blob = self._blob(blob_id)
                if blob is not None:  # removed from the store meanwhile: devices will time out and ask again
                    self._publish(blob, items, now)

    def _publish(self, blob: StoredBlob, items: list[int], now: float) -> None:
        blob_id = blob.blob_id
        topic = str(self.topics.blob_chunks(blob_id))
        for item in items:
            try:
                if item == HEAD:  # retained: a device subscribing late still gets it at once
                    payload: bytes | bytearray = messages.encode_head(blob.count, blob.manifest_bytes,
                                                                      blob.signature_bytes)
                    key, size_key = "heads_published", "head_bytes"
                    self.link.publish(topic, payload, qos=1, retain=True, expiry_s=self.head_expiry_s)
                else:
                    payload = blob.chunk_message(item)
                    key, size_key = "chunks_published", "chunk_bytes"
                    self.link.publish(topic, payload, qos=1, expiry_s=self.chunk_expiry_s)
            except Exception as exc:  # unreadable, too large for the broker, link refused: log, keep serving
                with self._lock:
                    self._stats["publish_failed"] += 1
                if self._throttle.allow(f"publish:{blob_id}", now):
                    log.error("cannot publish %s of blob %s: %s", "head" if item == HEAD else f"chunk {item}",
                              blob_id, exc)
                continue
            with self._lock:
                self._stats[key] += 1
                self._stats[size_key] += len(payload)

    def _blob(self, blob_id: str) -> StoredBlob | None:
        # Caching by blob id is safe: the id is the hash of the manifest, so the manifest (and the
        # model it signs) under one id never change; a new manifest for the same model is another
        # blob. Only the signature may be replaced (the same manifest re-signed) or the blob removed:
        # both swap or drop the directory, which the inode check below notices for one stat().
        # A miss is not cached: a bundle may be added at any time.
        try:
            inode = (self.store.blobs_dir / blob_id).stat().st_ino if _is_blob_id(blob_id) else None
        except OSError:
            inode = None
        with self._lock:
            cached = self._blobs.get(blob_id)
            if cached is not None and inode is not None and cached[1] == inode:
                return cached[0]
            self._blobs.pop(blob_id, None)
        if inode is None:
            return None
        blob = self.store.get(blob_id)
        if blob is not None:
            with self._lock:
                self._blobs[blob_id] = (blob, inode)
        return blob

    def _check_connection(self) -> None:
        """After our link reconnected, chunks 'on their way' may have died with the old connection."""
        info = getattr(self.link, "connect_info", None)
        if info is not self._connection:
            with self._lock:
                if self._connection is not None:
                    self._scheduler.clear()
                self._connection = info

    def _malformed(self, device: str, reason: str, now: float) -> None:
        with self._lock:
            self._stats["malformed"] += 1
        if self._throttle.allow(device, now):
            log.warning("dropped a malformed chunk request from %s: %s (further ones from it are dropped "
                        "silently for %.0fs)", device, reason, self._throttle.interval_s)


__all__ = ["BlobStore", "StoredBlob", "RepositoryService", "RepositoryError", "ChunkScheduler", "Throttle",
           "RequestRecord", "HEAD"]
