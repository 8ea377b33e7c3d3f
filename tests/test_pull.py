"""Pulling a model end to end: a real mosquitto, the repository service on a real MqttLink, and
devices built as the agent builds them (a main MqttLink, the Downloader on a BlobLink of its own)
with a real Installer, ModelStore and interpreter.

The digits model (~156 KB float) is bundled with 4 KiB chunks, so a pull is ~40 chunks.
Mid-transfer events (an agent stopping, the broker dying, a rogue injecting chunks) are
placed deterministically from the Downloader's own DEPLOY_PROGRESS events, never with sleeps.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import events as ev
from agent.errors import InstallError
from agent.blob_link import BlobLink
from agent.events import EventLog
from agent.installer import Installer
from agent.mqtt import MqttLink
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, messages, profiles
from agent.protocol.manifest import Manifest
from agent.protocol.topics import Topics
from agent.store import ModelStore
from agent.transfer import Downloader, DownloadState, RetryPolicy, TransferError
from fleet.repository import BlobStore, RepositoryService
from tests.support.broker import mosquitto, mosquitto_factory, plain_config  # noqa: F401  (fixtures)
from tests.support.agents import wait_for
from tests.support.bundles import make_bundle

FLEET = "test"
TOPICS = Topics(FLEET)
CHUNK = 4096
RETRY = RetryPolicy(base_s=1.5, cap_s=6.0, jitter=0.5)   # > the repository's 1 s merge window


@pytest.fixture(scope="module")
def profile():
    return profiles.load_profile("x86-cpu")


@pytest.fixture(scope="module")
def trusted(keys_dir):
    return keys.load_trusted_dir(keys_dir)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory, digits_tflite_float, release_key) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "digits.lfb", digits_tflite_float, release_key,
                       chunk_size=CHUNK)


@pytest.fixture(scope="module")
def blob(bundle_path) -> Manifest:
    return Manifest.parse(bundle_mod.read_bundle(bundle_path).manifest_bytes)


@pytest.fixture(scope="module")
def blob_id(bundle_path) -> str:
    """What a deploy command names: the hash of the signed manifest (blob.sha256 is the model's)."""
    return bundle_mod.blob_id(bundle_mod.read_bundle(bundle_path).manifest_bytes)


@dataclass
class Repo:
    link: MqttLink
    service: RepositoryService
    store: BlobStore

    def chunk_requests(self, device: str) -> list[tuple[int, ...]]:
        return [r.chunks for r in self.service.request_log(device) if r.chunks]


@dataclass
class Device:
    name: str
    link: MqttLink          # the main connection (status, commands), as in agent/transport.py
    stream: BlobLink        # the Downloader's connection, open only while it fetches
    store: ModelStore
    installer: Installer
    downloader: Downloader
    log: EventLog
    state_dir: Path
    disconnects: list[str] = field(default_factory=list)

    def install(self, parts: tuple[bytes, bytes, bytes]):
        result = self.installer.install_parts(*parts, source=f"mqtt:{self.name}")
        assert result.ok, result.message
        if result.loaded is not None:
            result.loaded.close()
        return result

    def progress(self, step: str | None = None) -> list[ev.Event]:
        return [e for e in self.log.of(ev.DEPLOY_PROGRESS) if step is None or e.details["step"] == step]


@pytest.fixture
def start_repo(tmp_path, trusted):
    repos: list[Repo] = []

    def start(url: str, bundles: list[Path], repo_trusted=None) -> Repo:
        store = BlobStore(tmp_path / f"repo{len(repos)}", repo_trusted or trusted)
        for path in bundles:
            store.add_bundle(path)
        link = MqttLink(url, f"litefleet-server{len(repos)}", backoff=(0.1, 1.0))
        service = RepositoryService(link, store, FLEET)
        service.start()
        link.start()
        assert link.wait_connected(10)
        repo = Repo(link, service, store)
        repos.append(repo)
        return repo

    yield start
    for repo in repos:
        repo.service.stop()
        repo.link.stop()


@pytest.fixture
def make_device(tmp_path, trusted, profile):
    devices: list[Device] = []

    def make(url: str, name: str, state_dir: Path | None = None, events=None, protocol: str = "auto") -> Device:
        state_dir = state_dir or tmp_path / name
        log = EventLog()
        sink = log if events is None else (lambda e: (log(e), events(e)))
        store = ModelStore(state_dir)
        installer = Installer(store, trusted, profile, events=log)
        device = Device(name, None, None, store, installer, None, log, state_dir)  # type: ignore[arg-type]
        device.link = MqttLink(url, name, backoff=(0.1, 1.0), protocol=protocol,
                               on_disconnect=device.disconnects.append)
        device.stream = BlobLink(url, f"{name}.blob", protocol=lambda: device.link.protocol_version,
                                 backoff=(0.1, 1.0))
        device.downloader = Downloader(device.stream, TOPICS, name, state_dir, installer, sink, retry=RETRY)
        device.link.start()
        assert device.link.wait_connected(10)
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.stream.stop()
        device.link.stop()


def prove_live(repo: Repo, device: Device, sha: str) -> None:
    """Wait until the repository's subscription answers (its SUBSCRIBE may trail its CONNACK)."""
    payload = messages.encode({"v": 1, "device_id": device.name, "blob": sha, "head": False, "chunks": []})
    device.link.publish(str(TOPICS.chunk_requests(device.name)), payload)
    wait_for(lambda: repo.service.request_log(device.name), what="the repository's subscription")


def assert_active(device: Device, sha: str) -> None:
    active = device.store.active()
    assert active is not None and active.manifest.sha256 == sha
    assert hashlib.sha256(active.read_model()).hexdigest() == sha


def test_one_device_pulls_and_installs(mosquitto, start_repo, make_device, bundle_path, blob, blob_id):
    repo = start_repo(mosquitto.url, [bundle_path])
    device = make_device(mosquitto.url, "dev1")
    prove_live(repo, device, blob_id)
    parts = device.downloader.fetch(blob_id, timeout_s=20)
    assert bytes(parts[2]) == repo.store.get(blob_id).model_path.read_bytes()
    device.install(parts)
    assert_active(device, blob.sha256)
    percents = [e.details["milestone"] for e in device.progress("progress")]
    assert percents[-1] == 100 and percents == sorted(set(percents)) and all(p % 25 == 0 for p in percents)
    assert device.progress("head_verified")[0].details["chunks_total"] == len(blob.chunks)
    assert repo.service.stats["chunks_published"] == len(blob.chunks)


def test_the_pull_connection_is_open_only_while_fetching(mosquitto, start_repo, make_device, bundle_path, blob,
                                                        blob_id):
    """An idle device holds one connection to the broker; a pull opens a second for its chunk
    stream (BlobLink) and closes it when done."""
    repo = start_repo(mosquitto.url, [bundle_path])
    seen: list[bool] = []
    device = make_device(mosquitto.url, "dev1", events=lambda e: seen.append(device.stream.connected)
                         if e.details.get("step") == "head_verified" else None)
    prove_live(repo, device, blob_id)
    assert not device.stream.connected
    parts = device.downloader.fetch(blob_id, timeout_s=20)
    assert seen == [True], "the stream connection carried the head"
    assert not device.stream.connected and device.stream._thread is None, "closed after the fetch"
    assert device.link.connected, "the main connection is untouched"
    device.install(parts)
    assert_active(device, blob.sha256)


def test_a_device_on_mqtt_311_pulls_on_mqtt_311(mosquitto, start_repo, make_device, bundle_path, blob, blob_id):
    """The embedded demo broker speaks 3.1.1 only: the stream connection uses the version the
    main link negotiated (here forced), with no MQTT 5 properties in its packets."""
    repo = start_repo(mosquitto.url, [bundle_path])
    device = make_device(mosquitto.url, "dev311", protocol="3.1.1")
    prove_live(repo, device, blob_id)
    parts = device.downloader.fetch(blob_id, timeout_s=20)
    assert device.stream.protocol_version == "3.1.1"
    device.install(parts)
    assert_active(device, blob.sha256)


def test_five_devices_share_one_stream(mosquitto, start_repo, make_device, bundle_path, blob, blob_id):
    repo = start_repo(mosquitto.url, [bundle_path])
    devices = [make_device(mosquitto.url, f"dev{n}") for n in range(5)]
    prove_live(repo, devices[0], blob_id)
    barrier = threading.Barrier(5)
    results: dict[str, object] = {}

    def pull(device: Device) -> None:
        barrier.wait(10)
        try:
            results[device.name] = device.downloader.fetch(blob_id, timeout_s=20)
        except Exception as exc:  # reported below
            results[device.name] = exc

    threads = [threading.Thread(target=pull, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for device in devices:
        parts = results[device.name]
        assert isinstance(parts, tuple), f"{device.name}: {parts!r}"
        device.install(parts)
        assert_active(device, blob.sha256)
    stats = repo.service.stats
    parts = bundle_mod.read_bundle(bundle_path)
    head_len = len(messages.encode_head(len(blob.chunks), parts.manifest_bytes, parts.signature_bytes))
    assert stats["heads_published"] <= 5
    assert stats["chunk_bytes"] <= 1.2 * blob.size, stats
    assert stats["bytes_published"] <= 1.2 * blob.size + stats["heads_published"] * head_len
    assert stats["merged"] > 0


def test_a_corrupted_chunk_from_a_rogue_is_rejected_and_the_real_one_installed(
        mosquitto, start_repo, make_device, bundle_path, blob, digits_tflite_float, blob_id):
    """The rogue needs publish rights on the blob stream: the plain test broker grants them; the
    production ACL that stops it is tested with the broker configuration."""
    repo = start_repo(mosquitto.url, [bundle_path])
    rogue = MqttLink(mosquitto.url, "rogue", clean_start=True)
    rogue.start()
    assert rogue.wait_connected(10)
    stream = str(TOPICS.blob_chunks(blob_id))
    count = len(blob.chunks)

    def inject(event: ev.Event) -> None:
        if event.details.get("step") != "head_verified":
            return
        tokens = []
        for index in range(count):      # a bad copy of every chunk, queued before any real one
            good = digits_tflite_float[index * CHUNK:(index + 1) * CHUNK]
            bad = bytes([good[0] ^ 0xFF]) + good[1:]
            tokens.append(rogue.publish(stream, messages.encode_chunk(index, count, bad)))
        assert all(t.wait(10) for t in tokens)

    device = make_device(mosquitto.url, "dev1", events=inject)
    prove_live(repo, device, blob_id)
    try:
        parts = device.downloader.fetch(blob_id, timeout_s=20)
    finally:
        rogue.stop()
    device.install(parts)
    assert_active(device, blob.sha256)
    plan = device.downloader.last_plan
    assert plan.rejected_count == count, "every bad copy was seen and refused"
    rejected = device.progress("chunk_rejected")
    assert rejected and "chunk 0 of digits v1 failed its sha256, re-requesting" == rejected[0].reason


def test_a_validly_signed_head_of_another_manifest_is_ignored(mosquitto, start_repo, make_device, bundle_path,
                                                              blob, blob_id, tmp_path, digits_tflite_float,
                                                              release_key, caplog):
    """A head whose manifest does not hash to the requested blob id is ignored even though it is
    signed by a trusted key and describes the same model bytes: here a rogue retains v2's head on
    v1's stream, and the device still installs v1, the manifest the deploy command named."""
    caplog.set_level(logging.WARNING, logger="litefleet.transfer")
    other = bundle_mod.read_bundle(make_bundle(tmp_path / "v2.lfb", digits_tflite_float, release_key,
                                               chunk_size=CHUNK, version=2))
    other_id = bundle_mod.blob_id(other.manifest_bytes)
    assert Manifest.parse(other.manifest_bytes).sha256 == blob.sha256 and other_id != blob_id
    repo = start_repo(mosquitto.url, [bundle_path])
    rogue = MqttLink(mosquitto.url, "rogue", clean_start=True)
    rogue.start()
    try:
        assert rogue.wait_connected(10)
        head = messages.encode_head(len(blob.chunks), other.manifest_bytes, other.signature_bytes)
        assert rogue.publish(str(TOPICS.blob_chunks(blob_id)), head, qos=1, retain=True).wait(10)
        device = make_device(mosquitto.url, "dev1")
        prove_live(repo, device, blob_id)
        manifest_bytes, _, _ = parts = device.downloader.fetch(blob_id, timeout_s=20)
    finally:
        rogue.stop()
    assert manifest_bytes == bundle_mod.read_bundle(bundle_path).manifest_bytes
    assert any(f"ignored a head on blob/{blob_id} whose manifest hashes to {other_id}" in r.getMessage()
               for r in caplog.records), "the rogue's head arrived (retained) and was ignored"
    device.install(parts)
    assert device.store.active().manifest.version == 1


def test_a_stopped_agent_resumes_asking_only_for_missing_chunks(mosquitto, start_repo, make_device,
                                                                 bundle_path, blob, blob_id):
    repo = start_repo(mosquitto.url, [bundle_path])

    def stop_at_a_quarter(event: ev.Event) -> None:
        if event.details.get("step") == "progress" and event.details["percent"] >= 25:
            first.downloader.cancel()

    first = make_device(mosquitto.url, "dev1", events=stop_at_a_quarter)
    prove_live(repo, first, blob_id)
    with pytest.raises(TransferError, match="cancelled") as info:
        first.downloader.fetch(blob_id, timeout_s=20)
    assert info.value.code == "cancelled"
    first.link.stop()                                  # the agent goes away

    state = DownloadState(first.state_dir / "downloads", blob_id)
    on_disk = state.open(blob)
    state.close()
    assert 0 < len(on_disk) < len(blob.chunks)
    assert on_disk == first.downloader.last_plan.present
    seen = len(repo.service.request_log("dev1"))
    heads = repo.service.stats["heads_published"]

    second = make_device(mosquitto.url, "dev1", state_dir=first.state_dir)  # same id, same state dir
    parts = second.downloader.fetch(blob_id, timeout_s=20)
    second.install(parts)
    assert_active(second, blob.sha256)
    later = repo.service.request_log("dev1")[seen:]
    # The verified head was kept on disk: never asked for alone. The first request flags the head
    # only to tell the repository that this stream subscription is new (a fresh connection).
    assert all(r.chunks for r in later if r.head) and later[0].head
    assert repo.service.stats["heads_published"] == heads, "the head was not sent again"
    asked = {i for r in later for i in r.chunks}
    assert asked and not asked & on_disk, f"re-asked for chunks already on disk: {sorted(asked & on_disk)}"
    assert "resuming with" in second.progress("head_verified")[0].reason


def test_broker_restart_mid_transfer_re_requests_at_most_one_window(mosquitto_factory, start_repo, make_device,
                                                                    bundle_path, blob, blob_id):
    broker = mosquitto_factory()
    repo = start_repo(broker.url, [bundle_path])
    paused, resume = threading.Event(), threading.Event()

    def hold_at_a_quarter(event: ev.Event) -> None:
        if event.details.get("step") == "progress" and not paused.is_set():
            paused.set()
            assert resume.wait(30)

    device = make_device(broker.url, "dev1", events=hold_at_a_quarter)
    prove_live(repo, device, blob_id)
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(
        parts=_catch(lambda: device.downloader.fetch(blob_id, window=4, timeout_s=25))))
    thread.start()
    assert paused.wait(20)
    done_before = device.downloader.last_plan.done
    broker.restart(kill=True)                           # SIGKILL: nothing saved, sessions lost
    wait_for(lambda: device.disconnects, what="the device to notice the broker died")
    resume.set()
    thread.join(60)
    parts = result["parts"]
    assert isinstance(parts, tuple), parts
    assert done_before < len(blob.chunks), "the restart happened mid-transfer"
    device.install(parts)
    assert_active(device, blob.sha256)
    counts: dict[int, int] = {}
    for chunks in repo.chunk_requests("dev1"):
        for i in chunks:
            counts[i] = counts.get(i, 0) + 1
    again = sorted(i for i, n in counts.items() if n > 1)
    assert len(again) <= 4, f"re-requested more than one window: {again}"
    assert set(counts) == set(range(len(blob.chunks))), "every chunk was asked for"


def _catch(function):
    try:
        return function()
    except Exception as exc:
        return exc


def test_no_repository_fails_after_the_deadline_naming_the_blob(mosquitto, make_device, blob_id):
    device = make_device(mosquitto.url, "dev1")
    started = time.monotonic()
    with pytest.raises(TransferError) as info:
        device.downloader.fetch(blob_id, timeout_s=2.0)
    elapsed = time.monotonic() - started
    assert info.value.code == "no_answer" and info.value.blob == blob_id
    assert blob_id in str(info.value) and "repository did not answer" in str(info.value)
    assert 2.0 <= elapsed < 4.0
    assert device.store.active() is None


def test_a_bundle_signed_by_an_unknown_key_is_rejected_at_the_head(mosquitto, start_repo, make_device,
                                                                   trusted, tmp_path, digits_tflite_float):
    other = tmp_path / "other-keys"
    keys.generate("release", other)
    path = make_bundle(tmp_path / "unknown.lfb", digits_tflite_float, keys.load_private(other / "release.key"),
                       chunk_size=CHUNK, version=2)
    sha = bundle_mod.blob_id(bundle_mod.read_bundle(path).manifest_bytes)
    repo = start_repo(mosquitto.url, [path], repo_trusted=[*trusted, keys.load_public(other / "release.pub")])
    device = make_device(mosquitto.url, "dev1")
    prove_live(repo, device, sha)
    with pytest.raises(InstallError) as info:
        device.downloader.fetch(sha, timeout_s=20)
    assert info.value.code == "bad_signature"
    asked = [r for r in repo.service.request_log("dev1") if r.head or r.chunks]
    assert asked and all(r.head and not r.chunks for r in asked), "no chunk was requested"
    assert repo.service.stats["chunks_published"] == 0
    assert not (device.state_dir / "downloads" / sha).exists(), "nothing of it is kept"


def test_chunks_larger_than_the_brokers_packet_limit_fail_clearly(mosquitto_factory, start_repo, make_device,
                                                                  tmp_path, digits_tflite_float, release_key):
    path = make_bundle(tmp_path / "big-chunks.lfb", digits_tflite_float, release_key, chunk_size=32 * 1024)
    sha = bundle_mod.blob_id(bundle_mod.read_bundle(path).manifest_bytes)
    broker = mosquitto_factory(lambda port: plain_config(port, "max_packet_size 16384"))
    repo = start_repo(broker.url, [path])
    device = make_device(broker.url, "dev1")
    assert device.link.max_packet_size == 16384, "mosquitto announces its limit over MQTT 5"
    prove_live(repo, device, sha)
    limits: list[int | None] = []
    device.stream.subscribe("probe/limit", lambda m: None)
    assert device.stream.wait_connected(10)
    limits.append(device.stream.max_packet_size)
    device.stream.unsubscribe("probe/limit")
    assert limits == [16384], "the stream connection reads the same limit from its CONNACK"
    with pytest.raises(TransferError) as info:
        device.downloader.fetch(sha, timeout_s=10)
    assert info.value.code == "packet_too_large"
    assert "32768-byte chunks" in str(info.value) and "16384" in str(info.value)
    assert not any(r.chunks for r in repo.service.request_log("dev1"))
