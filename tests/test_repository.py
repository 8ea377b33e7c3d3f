"""The host's repository: the verified, content-addressed store, the merge decisions (pure, time
passed in), and the service answering chunk requests through a real mosquitto and real MqttLinks."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import pytest

from agent.mqtt import MqttLink
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, messages
from agent.protocol.manifest import MODEL_FILENAME
from agent.protocol.topics import Topics
from fleet.repository import HEAD, BlobStore, ChunkScheduler, RepositoryError, RepositoryService, Throttle
from tests.support.broker import mosquitto, mosquitto_factory  # noqa: F401  (fixtures)
from tests.support.agents import wait_for
from tests.support.bundles import make_bundle

FLEET = "test"
TOPICS = Topics(FLEET)
CHUNK = 4096


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory, digits_tflite_float, release_key) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "digits.lfb", digits_tflite_float, release_key,
                       chunk_size=CHUNK)


@pytest.fixture(scope="module")
def trusted(keys_dir):
    return keys.load_trusted_dir(keys_dir)


# --- ChunkScheduler and Throttle (pure) ----------------------------------------------------------------


def test_requests_for_a_chunk_on_its_way_are_merged():
    s = ChunkScheduler(window_s=1.0, start_s=0)
    assert s.claim("b", [7], 0.0) == [7]
    for device in range(99):                 # 99 more devices ask within the window
        assert s.claim("b", [7], 0.001 * device) == []
    assert s.claim("b", [6, 7, 8], 0.5) == [6, 8]


def test_a_re_request_after_the_window_is_served_again():
    s = ChunkScheduler(window_s=1.0, start_s=0)
    s.claim("b", [7], 0.0)
    assert s.claim("b", [7], 0.99) == []
    assert s.claim("b", [7], 1.0) == [7]
    assert s.claim("b", [7], 1.5) == [], "the window restarts from the last publish"


def test_head_and_blobs_are_tracked_separately_and_clear_forgets():
    s = ChunkScheduler(window_s=1.0, start_s=0)
    assert s.claim("a", [HEAD, 0], 0.0) == [HEAD, 0]
    assert s.claim("b", [HEAD, 0], 0.0) == [HEAD, 0]
    assert s.claim("a", [HEAD, 0, 0, 1], 0.1) == [1], "duplicates in one request count once"
    assert s.recently_sent("a", HEAD, 0.5) and not s.recently_sent("a", HEAD, 1.0)
    s.clear()
    assert s.claim("a", [0], 0.2) == [0]


def test_a_copy_sent_after_a_devices_first_request_is_on_its_way_to_it():
    s = ChunkScheduler(start_s=0)
    assert s.claim("b", [HEAD], 0.0, "a") == [HEAD]
    assert s.claim("b", [HEAD], 0.5, "b") == [], "the head is retained: b gets it on subscribing"
    assert s.claim("b", [3], 1.0, "a") == [3]
    assert s.claim("b", [3], 9.0, "b") == [], "b subscribed at 0.5, before chunk 3 went out at 1.0"


def test_a_device_that_subscribed_after_the_copy_went_out_is_served():
    s = ChunkScheduler(start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    s.claim("b", [3], 1.0, "a")
    assert s.claim("b", [HEAD], 1.2, "late") == []
    assert s.claim("b", [3], 1.3, "late") == [3], "late was not on the stream when chunk 3 went out"


def test_a_first_re_ask_waits_for_the_copy_on_its_way_a_second_is_served():
    """100 devices on two cores took over 2 s to drain their copies: their retries each cost a
    copy to every device on the stream, which made the others slower still."""
    s = ChunkScheduler(resend_s=0.25, gather_s=0, start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    s.claim("b", [HEAD], 0.0, "c")
    assert s.claim("b", [5], 1.0, "a") == [5]
    assert s.claim("b", [5], 3.0, "a") == [], "a is slow: the copy of 1.0 is still on its way"
    assert s.claim("b", [5], 7.0, "a") == [5], "asked twice more: it was lost, served"
    assert s.claim("b", [5], 7.1, "c") == [], "c's first ask rides on the resend at 7.0"
    assert s.claim("b", [5], 7.2, "a") == [], "retries within resend_s cost no copy"


def test_a_re_ask_long_after_the_copy_is_served():
    s = ChunkScheduler(patience_s=60.0, gather_s=0, start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    assert s.claim("b", [5], 1.0, "a") == [5]
    assert s.claim("b", [5], 61.0, "a") == [5], "after patience_s the copy may have expired in the broker"


def test_asking_for_the_head_again_starts_afresh():
    """A resumed fetch (or a reconnect that lost the session) subscribes anew: copies sent before
    it no longer count as on their way."""
    s = ChunkScheduler(gather_s=0, start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    assert s.claim("b", [0, 1], 1.0, "a") == [0, 1]
    assert s.claim("b", [HEAD, 1, 2], 5.0, "a") == [1, 2], "chunk 1 went out before the new subscription"
    assert s.claim("b", [2], 9.0, "a") == [], "chunk 2 of 5.0 is on its way to the new subscription"


# --- gathering ------------------------------------------------------------------------------------------


def test_chunks_wait_for_devices_that_asked_for_the_head_then_go_out_once():
    s = ChunkScheduler(gather_s=0.5, max_gather_s=2.0, start_s=0, settle_s=0)
    assert s.claim("b", [HEAD], 0.00, "a") == [HEAD]
    assert s.claim("b", [HEAD], 0.01, "b") == []
    assert s.claim("b", [0, 1], 0.02, "a") == [], "b asked for the head and not yet for chunks"
    assert s.held("b") == [0, 1] and s.next_release() == 0.51
    assert s.claim("b", [HEAD], 0.10, "c") == [], "c joins the wait"
    assert s.claim("b", [0, 1, 2], 0.15, "b") == [] and s.held("b") == [0, 1, 2]
    assert s.claim("b", [0, 1, 2], 0.20, "c") == [0, 1, 2], "the last device waited for asked: all go out"
    assert s.held("b") == [] and s.next_release() is None
    assert s.claim("b", [0, 1, 2], 9.0, "a") == [], "a's held ask rode on the copy of 0.20"


def test_held_chunks_wait_until_devices_stop_joining_for_settle_s():
    """Devices open their pull connection when the command reaches them: their head requests
    trickle in. Released as soon as the early ones had all asked, the stragglers would need a copy."""
    s = ChunkScheduler(gather_s=0.5, max_gather_s=2.0, start_s=0, settle_s=0.25)
    s.claim("b", [HEAD], 0.00, "a")
    s.claim("b", [HEAD], 0.01, "b")
    assert s.claim("b", [0], 0.02, "a") == []
    assert s.claim("b", [0], 0.05, "b") == [], "every joiner asked, but b joined 0.04 s ago"
    assert s.next_release() == pytest.approx(0.26)
    s.claim("b", [HEAD], 0.20, "straggler")
    assert s.claim("b", [0], 0.22, "straggler") == [], "the straggler rides on the held copy"
    assert s.release(0.44) == {}
    assert s.next_release() == pytest.approx(0.45)
    assert s.release(0.45) == {"b": [0]}, "one copy for all three"


def test_a_device_alone_is_never_held():
    s = ChunkScheduler(gather_s=0.5, start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    assert s.claim("b", [0, 1, 2, 3], 0.01, "a") == [0, 1, 2, 3]
    assert s.next_release() is None


def test_a_device_that_never_asks_for_chunks_is_waited_for_gather_s_at_most():
    s = ChunkScheduler(gather_s=0.5, max_gather_s=2.0, start_s=0)
    s.claim("b", [HEAD], 0.0, "refused")         # e.g. its manifest check failed: no chunk ask follows
    s.claim("b", [HEAD], 0.1, "a")
    assert s.claim("b", [0], 0.2, "a") == []
    assert s.release(0.49) == {}
    assert s.next_release() == 0.5
    assert s.release(0.5) == {"b": [0]}
    assert s.claim("b", [0], 0.6, "late") == [0], "a device that asked first after the release gets its copy"


def test_devices_that_keep_joining_are_waited_for_max_gather_s_at_most():
    s = ChunkScheduler(gather_s=0.5, max_gather_s=2.0, start_s=0)
    s.claim("b", [HEAD], 0.0, "d0")
    s.claim("b", [HEAD], 0.0, "d1")
    assert s.claim("b", [0], 0.0, "d0") == []
    for n in range(2, 20):                       # a new device asks for the head every 0.1 s
        s.claim("b", [HEAD], n / 10, f"d{n}")
        assert s.release(n / 10) == {}
    assert s.next_release() == 2.0
    assert s.release(2.0) == {"b": [0]}


def test_a_new_streams_first_chunks_wait_start_s_for_devices_starting_a_little_later():
    s = ChunkScheduler(start_s=0.05, gather_s=0.5, settle_s=0)
    s.claim("b", [HEAD], 0.00, "a")
    assert s.claim("b", [0, 1], 0.01, "a") == [], "nobody else yet, but the stream is new"
    assert s.next_release() == pytest.approx(0.06)
    s.claim("b", [HEAD], 0.03, "b")
    assert s.claim("b", [0, 1], 0.04, "b") == [], "held until the start hold is over"
    assert s.release(0.055) == {}
    assert s.release(0.07) == {"b": [0, 1]}
    assert s.claim("b", [0, 1], 1.0, "c") == [0, 1], "the stream is not new any more: c is served at once"


def test_gathering_time_zero_turns_gathering_off():
    s = ChunkScheduler(gather_s=0.0, start_s=0)
    s.claim("b", [HEAD], 0.0, "a")
    s.claim("b", [HEAD], 0.0, "b")
    assert s.claim("b", [0], 0.0, "a") == [0]
    with pytest.raises(ValueError, match="gathering time must be >= 0"):
        ChunkScheduler(gather_s=-1)
    with pytest.raises(ValueError, match="start hold must be >= 0"):
        ChunkScheduler(start_s=-0.1)


def test_old_entries_are_pruned():
    s = ChunkScheduler(window_s=1.0, start_s=0)
    for i in range(1000):
        s.claim(f"blob{i}", [HEAD, 0, 1, 2], 0.0, f"dev{i}")
    s.claim("x", [0], s.head_keep_s + 1)
    assert list(s._sent) == ["x"] and not s._asked


def test_throttle_allows_one_per_key_per_interval():
    t = Throttle(60.0)
    assert t.allow("dev1", 0.0) and t.allow("dev2", 1.0)
    assert not t.allow("dev1", 59.0)
    assert t.allow("dev1", 60.0)


# --- BlobStore ---------------------------------------------------------------------------------------


def test_store_verifies_then_writes_by_manifest_hash(tmp_path, bundle_path, trusted, digits_tflite_float):
    store = BlobStore(tmp_path / "repo", trusted)
    stored = store.add_bundle(bundle_path)
    blob_id = hashlib.sha256(bundle_mod.read_bundle(bundle_path).manifest_bytes).hexdigest()
    assert stored.blob_id == blob_id and store.list() == [blob_id]
    assert stored.manifest.sha256 == hashlib.sha256(digits_tflite_float).hexdigest() != blob_id
    blob = store.get(blob_id)
    assert blob is not None and blob.count == len(digits_tflite_float) // CHUNK + 1
    assert (tmp_path / "repo" / "blobs" / blob_id / MODEL_FILENAME).read_bytes() == digits_tflite_float
    assert b"".join(blob.read_chunk(i) for i in range(blob.count)) == digits_tflite_float
    assert all(blob.chunk_message(i) == messages.encode_chunk(i, blob.count, blob.read_chunk(i))
               for i in range(blob.count)), "the stream message is the header, then the chunk read in place"
    assert store.add_bundle(bundle_path).blob_id == blob_id, "adding the same bundle again is harmless"
    assert store.list() == [blob_id]
    assert store.get(stored.manifest.sha256) is None, "the model's hash is not a blob id"
    assert store.get("0" * 64) is None and store.get("../etc") is None


def test_a_model_file_shorter_than_its_manifest_is_an_error_naming_it(tmp_path, bundle_path, trusted):
    store = BlobStore(tmp_path / "repo", trusted)
    blob = store.add_bundle(bundle_path)
    with open(blob.model_path, "r+b") as handle:
        handle.truncate(blob.manifest.size - 10)
    with pytest.raises(RepositoryError, match=rf"{blob.model_path} is shorter than its manifest says \(chunk "
                                              rf"{blob.count - 1}: \d+ of \d+ bytes\)"):
        blob.chunk_message(blob.count - 1)


def test_one_model_for_two_profiles_is_two_blobs_each_with_its_own_manifest(tmp_path, trusted, release_key,
                                                                              digits_tflite_int8):
    """The same int8 model bytes converted for rpi4-cpu and rpi-zero2w-cpu: a rollout carries both
    bundles; adding the second must not replace the first's manifest."""
    store = BlobStore(tmp_path / "repo", trusted)
    paths = {p: make_bundle(tmp_path / f"{p}.lfb", digits_tflite_int8, release_key, profile=p, mode="int8",
                            chunk_size=CHUNK) for p in ("rpi4-cpu", "rpi-zero2w-cpu")}
    stored = {p: store.add_bundle(path) for p, path in paths.items()}
    assert stored["rpi4-cpu"].manifest.sha256 == stored["rpi-zero2w-cpu"].manifest.sha256
    assert stored["rpi4-cpu"].blob_id != stored["rpi-zero2w-cpu"].blob_id
    assert sorted(store.list()) == sorted(b.blob_id for b in stored.values())
    for profile, path in paths.items():
        blob = store.get(stored[profile].blob_id)
        assert blob.manifest.profile == profile
        assert blob.manifest_bytes == bundle_mod.read_bundle(path).manifest_bytes
        assert blob.model_path.read_bytes() == digits_tflite_int8


def test_store_refuses_unsigned_and_tampered_bundles_and_writes_nothing(tmp_path, digits_tflite_float, trusted):
    other = tmp_path / "other-keys"
    keys.generate("release", other)
    rogue = make_bundle(tmp_path / "rogue.lfb", digits_tflite_float, keys.load_private(other / "release.key"),
                        chunk_size=CHUNK)
    store = BlobStore(tmp_path / "repo", trusted)
    with pytest.raises(RepositoryError, match="rogue.lfb: refused, not stored: .*(untrusted|trusted|unknown)"):
        store.add_bundle(rogue)
    assert list((tmp_path / "repo" / "blobs").iterdir()) == []


def test_store_refuses_a_model_that_does_not_match_its_manifest(tmp_path, bundle_path, trusted):
    parts = bundle_mod.read_bundle(bundle_path)
    model = bytearray(parts.model)
    model[5000] ^= 0xFF
    store = BlobStore(tmp_path / "repo", trusted)
    with pytest.raises(RepositoryError, match="chunk 1"):
        store.add_parts(parts.manifest_bytes, parts.signature_bytes, bytes(model))
    assert store.list() == []


# --- RepositoryService over a real broker --------------------------------------------------------------


class Watcher:
    """A real subscriber on a blob stream, recording what arrives."""

    def __init__(self, url: str, sha: str) -> None:
        self.messages: list[messages.ChunkMessage] = []
        self.bytes = 0
        self._lock = threading.Lock()
        self.link = MqttLink(url, f"watcher-{sha[:8]}", clean_start=True)
        self.link.subscribe(str(TOPICS.blob_chunks(sha)), self._on)
        self.link.start()
        assert self.link.wait_connected(10)

    def _on(self, message) -> None:
        with self._lock:
            self.messages.append(messages.decode_chunk(message.payload, message.topic))
            self.bytes += len(message.payload)

    def indices(self) -> list[int]:
        with self._lock:
            return [m.index if m.kind == messages.KIND_CHUNK else HEAD for m in self.messages]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(mosquitto, tmp_path, bundle_path, trusted):
    """A repository service on a real broker holding the digits bundle, a watcher on its stream,
    a device-side link to send requests from, and a hand-driven clock."""
    store = BlobStore(tmp_path / "repo", trusted)
    sha = store.add_bundle(bundle_path).blob_id
    clock = Clock()
    server = MqttLink(mosquitto.url, "litefleet-server", clean_start=True)
    service = RepositoryService(server, store, FLEET, clock=clock, start_s=0)   # held chunks need a running clock
    service.start()
    server.start()
    watcher = Watcher(mosquitto.url, sha)
    device = MqttLink(mosquitto.url, "requester", clean_start=True)
    device.start()
    assert server.wait_connected(10) and device.wait_connected(10)
    # prove the service's subscription is live before the test starts counting
    ask(device, "probe", sha, head=True)
    wait_for(lambda: watcher.indices() == [HEAD], what="the probe's head")
    clock.now += 10
    yield service, watcher, device, sha, clock
    for link in (device, watcher.link, server):
        link.stop()


def ask(link: MqttLink, device: str, sha: str, chunks=(), head=False, raw: bytes | None = None):
    payload = raw if raw is not None else messages.encode(
        {"v": 1, "device_id": device, "blob": sha, "head": head, "chunks": list(chunks)})
    return link.publish(str(TOPICS.chunk_requests(device)), payload, qos=1)


def test_a_hundred_devices_asking_for_chunk_7_cause_one_publish(served):
    service, watcher, device, sha, clock = served
    before = service.stats
    for n in range(100):                      # as real devices do: the head first, then chunks
        ask(device, f"dev{n:03d}", sha, head=True)
        ask(device, f"dev{n:03d}", sha, [7])
    wait_for(lambda: service.stats["requests"] - before["requests"] == 200, what="200 requests handled")
    after = service.stats
    assert after["chunks_published"] - before["chunks_published"] == 1
    assert after["heads_published"] - before["heads_published"] == 0, "the retained head serves them all"
    assert after["merged"] - before["merged"] == 199
    wait_for(lambda: 7 in watcher.indices(), what="chunk 7 on the stream")
    clock.now += 1.5                          # a device that was not on the stream when it went out
    ask(device, "late", sha, head=True)
    ask(device, "late", sha, [7])
    wait_for(lambda: watcher.indices().count(7) == 2, what="chunk 7 served again")
    assert service.request_log("late")[-1].published == (7,)


def test_published_bytes_are_counted_and_chunks_are_intact(served, digits_tflite_float):
    service, watcher, device, sha, clock = served
    count = len(digits_tflite_float) // CHUNK + 1
    ask(device, "dev1", sha, range(count))
    wait_for(lambda: len(watcher.messages) == 1 + count, what="every chunk")
    chunks = {m.index: m.payload for m in watcher.messages if m.kind == messages.KIND_CHUNK}
    assert b"".join(chunks[i] for i in range(count)) == digits_tflite_float
    assert all(m.count == count for m in watcher.messages)
    assert service.stats["bytes_published"] == watcher.bytes
    assert service.stats["chunk_bytes"] == len(digits_tflite_float) + count * messages.HEADER_SIZE


def test_malformed_requests_are_dropped_with_one_log_line_per_device_and_serving_goes_on(served, caplog):
    service, watcher, device, sha, clock = served
    caplog.set_level(logging.WARNING, logger="litefleet.repository")
    before = service.stats["malformed"]
    ask(device, "bad1", sha, raw=b"\xff not json")
    ask(device, "bad1", sha, raw=b'{"v": 1}')
    ask(device, "bad1", sha, raw=messages.encode({"v": 1, "device_id": "bad1", "blob": sha, "chunks": [-1]}))
    ask(device, "bad2", sha, raw=messages.encode({"v": 1, "device_id": "someone-else", "blob": sha,
                                                  "chunks": [0]}))
    ask(device, "bad3", sha, [10_000])          # out of range for this blob
    wait_for(lambda: service.stats["malformed"] - before == 5, what="5 malformed requests counted")

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "litefleet.repository"]
    wait_for(lambda: len(lines()) == 3, what="one log line per misbehaving device")  # logged after counting
    lines = lines()
    assert len([line for line in lines if "bad1" in line]) == 1, lines
    assert any("does not match the topic's device 'bad2'" in line for line in lines)
    assert any("bad3" in line and "10000" in line for line in lines)
    ask(device, "good", sha, [3])
    wait_for(lambda: 3 in watcher.indices(), what="a good request served after the bad ones")


def test_unknown_blob_gets_no_answer_and_is_counted(served, caplog):
    service, watcher, device, sha, clock = served
    caplog.set_level(logging.WARNING, logger="litefleet.repository")
    unknown = "ab" * 32
    ask(device, "dev9", unknown, [0], head=True)
    wait_for(lambda: service.stats["unknown_blob"] == 1, what="the unknown blob counted")
    assert service.request_log("dev9")[-1].outcome == "unknown_blob"
    wait_for(lambda: any(unknown in r.getMessage() and "does not hold" in r.getMessage() for r in caplog.records),
             what="a log line naming the unknown blob")
    assert service.stats["heads_published"] == 1, "only the probe's head was ever published"


def test_each_profiles_blob_serves_its_own_head_though_the_model_is_the_same(mosquitto, tmp_path, trusted,
                                                                              release_key, digits_tflite_int8):
    """Devices of the first profile keep getting their own manifest after the second profile's
    bundle of the same model is added (before blob ids, it replaced the first and they refused it)."""
    store = BlobStore(tmp_path / "repo", trusted)
    parts = {}
    for profile in ("rpi4-cpu", "rpi-zero2w-cpu"):
        path = make_bundle(tmp_path / f"{profile}.lfb", digits_tflite_int8, release_key, profile=profile,
                           mode="int8", chunk_size=CHUNK)
        parts[profile] = bundle_mod.read_bundle(path)
    server = MqttLink(mosquitto.url, "litefleet-server", clean_start=True)
    service = RepositoryService(server, store, FLEET)
    service.start()
    server.start()
    device = MqttLink(mosquitto.url, "requester", clean_start=True)
    device.start()
    first = store.add_parts(parts["rpi4-cpu"].manifest_bytes, parts["rpi4-cpu"].signature_bytes,
                            parts["rpi4-cpu"].model)
    watchers = {}
    try:
        assert server.wait_connected(10) and device.wait_connected(10)
        watchers["rpi4-cpu"] = Watcher(mosquitto.url, first.blob_id)
        ask(device, "pi4", first.blob_id, head=True)   # served, and cached by the service
        wait_for(lambda: watchers["rpi4-cpu"].indices() == [HEAD], what="the rpi4 head")
        second = store.add_parts(parts["rpi-zero2w-cpu"].manifest_bytes, parts["rpi-zero2w-cpu"].signature_bytes,
                                 parts["rpi-zero2w-cpu"].model)
        watchers["rpi-zero2w-cpu"] = Watcher(mosquitto.url, second.blob_id)
        ask(device, "zero", second.blob_id, head=True)
        ask(device, "pi4b", first.blob_id, head=True)
        for profile, watcher in watchers.items():
            wait_for(lambda: HEAD in watcher.indices(), what=f"the {profile} head")
            heads = [m for m in watcher.messages if m.kind == messages.KIND_HEAD]
            manifest_bytes, _ = messages.split_head(heads[0], "test")
            assert manifest_bytes == parts[profile].manifest_bytes, f"{profile} got another profile's manifest"
        assert service.stats["unknown_blob"] == 0
    finally:
        for link in [device, server] + [w.link for w in watchers.values()]:
            link.stop()
