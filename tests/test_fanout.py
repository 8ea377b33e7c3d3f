"""Many devices pulling one model: the repository publishes it about once.

Real parts: one mosquitto, the real RepositoryService, and real Downloaders in this process,
each with its own BlobLink (the agent's connection for pulls), state directory, Installer and
ModelStore (the manifest's signature and every chunk's sha256 are checked). The model is the digits CNN (~156 KB) in
4 KiB chunks, about 40 of them, so each device asks for a window and refills it as chunks come.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.blob_link import BlobLink
from agent.installer import Installer
from agent.mqtt import MqttLink
from agent.protocol import keys, messages, profiles
from agent.protocol.topics import Topics
from agent.store import ModelStore
from agent.transfer import Downloader, RetryPolicy
from fleet.repository import BlobStore, RepositoryService
from tests.support.agents import wait_for
from tests.support.broker import Mosquitto
from tests.support.bundles import make_bundle

FLEET = "test"
TOPICS = Topics(FLEET)
CHUNK = 4096
DEVICES = 12
TARGET = 1.2        # bytes published <= 1.2 x the model


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(None, tmp_path_factory.mktemp("broker")) as mosq:
        yield mosq


@pytest.fixture
def start_repo(broker, tmp_path, keys_dir):
    """``start_repo(**options)``: a RepositoryService (own store and link) with those options."""
    services: list[RepositoryService] = []

    def start(**options) -> RepositoryService:
        store = BlobStore(tmp_path / f"repo{len(services)}", keys.load_trusted_dir(keys_dir))
        link = MqttLink(broker.url, f"litefleet-server{len(services)}", backoff=(0.1, 1.0), clean_start=True)
        service = RepositoryService(link, store, FLEET, **options)
        service.start()
        link.start()
        assert link.wait_connected(10)
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()
        service.link.stop()


@pytest.fixture(scope="module")
def devices(broker, tmp_path_factory, keys_dir):
    trusted = keys.load_trusted_dir(keys_dir)
    profile = profiles.load_profile("x86-cpu")
    made = []
    for n in range(DEVICES):
        name = f"dev{n:02d}"
        state = tmp_path_factory.mktemp(name)
        link = BlobLink(broker.url, f"{name}.blob", backoff=(0.1, 1.0))
        installer = Installer(ModelStore(state), trusted, profile)
        made.append(Downloader(link, TOPICS, name, state, installer, retry=RetryPolicy(base_s=1.5, cap_s=6.0)))
    yield made
    for downloader in made:
        downloader.link.stop()


@pytest.fixture(scope="module")
def probe(broker):
    """A plain client that speaks for any device (the test broker has no ACL)."""
    link = MqttLink(broker.url, "probe", backoff=(0.1, 1.0), clean_start=True)
    link.start()
    assert link.wait_connected(10)
    yield link
    link.stop()


def add_blob(repo: RepositoryService, path: Path, model: bytes, release_key, version: int) -> str:
    """A new blob (its own stream): the same model under another signed manifest."""
    bundle = make_bundle(path, model, release_key, chunk_size=CHUNK, version=version)
    return repo.store.add_bundle(bundle).blob_id


def prove_live(repo: RepositoryService, probe: MqttLink, downloader: Downloader, blob_id: str) -> None:
    """Wait until the repository's subscription answers (its SUBSCRIBE may trail its CONNACK)."""
    payload = messages.encode({"v": 1, "device_id": downloader.device_id, "blob": blob_id, "head": False,
                               "chunks": []})
    probe.publish(str(TOPICS.chunk_requests(downloader.device_id)), payload)
    wait_for(lambda: repo.request_log(downloader.device_id, blob_id), what="the repository's subscription")


def fetch_all(devices: list[Downloader], blob_id: str, start) -> dict[str, object]:
    """Run every device's fetch on its own thread, started by ``start(n, thread)``; return results."""
    results: dict[str, object] = {}

    def fetch(downloader: Downloader) -> None:
        try:
            results[downloader.device_id] = downloader.fetch(blob_id, timeout_s=30)
        except Exception as exc:  # reported by the caller
            results[downloader.device_id] = exc

    threads = [threading.Thread(target=fetch, args=(d,)) for d in devices]
    for n, thread in enumerate(threads):
        start(n, thread)
    for thread in threads:
        thread.join(60)
    for downloader in devices:
        downloader.discard(blob_id)
    return results


def assert_one_copy(repo: RepositoryService, before: dict, results: dict, model: bytes) -> None:
    for device, parts in sorted(results.items()):
        assert isinstance(parts, tuple), f"{device}: {parts!r}"
        assert bytes(parts[2]) == model
    after = repo.stats
    published = after["bytes_published"] - before["bytes_published"]
    assert published <= TARGET * len(model), (
        f"{published} bytes published for {len(results)} devices and a {len(model)}-byte model "
        f"({published / len(model):.2f}x): {[(r.device_id, r.published) for r in repo.request_log() if r.published]}")
    assert after["heads_published"] - before["heads_published"] == 1, "the retained head served every device"


def test_a_fleet_starting_on_one_command_costs_one_copy(start_repo, devices, probe, tmp_path, digits_tflite_float,
                                                        release_key):
    """Every device starts when 'the command arrives'; they reach the repository one after
    another as they get the CPU. Those that asked for the head while the first asked for chunks
    are waited for (before: 2.7x the model for 100 simulated devices, one copy per wave)."""
    repo = start_repo()
    blob_id = add_blob(repo, tmp_path / "v1.lfb", digits_tflite_float, release_key, 1)
    prove_live(repo, probe, devices[0], blob_id)
    before = repo.stats
    results = fetch_all(devices, blob_id, lambda n, thread: thread.start())
    assert_one_copy(repo, before, results, digits_tflite_float)


def test_devices_starting_one_after_another_share_one_copy_with_a_start_hold(start_repo, devices, probe, tmp_path,
                                                                              digits_tflite_float, release_key):
    """Each device starts only once the previous one's first request reached the repository, so
    most ask for chunks after the one before them got the whole model: without a start hold each
    such wave costs a copy. With ``start_s`` the first chunks wait for them."""
    repo = start_repo(start_s=1.0)
    blob_id = add_blob(repo, tmp_path / "v1.lfb", digits_tflite_float, release_key, 1)
    prove_live(repo, probe, devices[0], blob_id)
    before = repo.stats

    def one_after_another(n: int, thread: threading.Thread) -> None:
        if n:
            previous = devices[n - 1].device_id
            wait_for(lambda: any(r.head or r.chunks for r in repo.request_log(previous, blob_id)),
                     what=f"{previous}'s first request", interval=0.001)
        thread.start()

    results = fetch_all(devices, blob_id, one_after_another)
    assert_one_copy(repo, before, results, digits_tflite_float)
    released = [r for r in repo.request_log(blob=blob_id) if r.outcome == "released"]
    first_ask = min(r.time for r in repo.request_log(blob=blob_id) if r.chunks)
    assert released and released[0].time - first_ask >= 1.0 - 1e-3, "held for the start hold"


def test_a_device_alone_is_not_held(start_repo, devices, probe, tmp_path, digits_tflite_float, release_key):
    """Nobody else asked for the head: its chunks go out with its request (no start hold by default)."""
    repo = start_repo()
    blob_id = add_blob(repo, tmp_path / "v2.lfb", digits_tflite_float, release_key, 2)
    alone = devices[0]
    prove_live(repo, probe, alone, blob_id)
    parts = alone.fetch(blob_id, timeout_s=30)
    alone.discard(blob_id)
    assert bytes(parts[2]) == digits_tflite_float
    asks = [r for r in repo.request_log(alone.device_id, blob_id) if r.chunks]
    assert asks and all(r.published == r.chunks for r in asks), "every chunk went out with its request"
    assert not any(r.outcome == "released" for r in repo.request_log(blob=blob_id))
    count = -(-len(digits_tflite_float) // CHUNK)
    assert repo.stats["chunk_bytes"] == len(digits_tflite_float) + count * messages.HEADER_SIZE, "each chunk once"
