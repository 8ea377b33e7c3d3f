"""Shared parts of the MQTT benchmarks: brokers, signed random bundles, repository and device workers.

Brokers are real mosquitto children on free ports (``tests.support.broker.Mosquitto``), with
one of two configurations:

* :func:`project_config` -- the limits of the configuration ``litefleet broker config``
  generates (``fleet.broker.render_mosquitto_conf``: ``set_tcp_nodelay``, ``max_packet_size``
  fitting the chunk, ``max_queued_messages 0``, ``max_queued_bytes``, ``max_inflight_messages``),
  taken from the rendered text itself so the benchmarks follow the project's settings, on a
  plain anonymous TCP listener instead of the TLS one (no certificates, no ACL);
* :func:`default_config` -- mosquitto's defaults: a listener and nothing else (plus
  ``allow_anonymous true``, without which 2.0 refuses every client).

Processes (multiprocessing, ``spawn``) keep the host and the device on separate interpreters,
as they are on separate machines: :func:`repository_main` runs the real
``RepositoryService``; :func:`raw_publisher_main` is the raw baseline's paho publisher;
:func:`devices_main` hosts N simulated devices (each its own ``MqttLink``, state directory,
real ``Installer`` and ``ModelStore``, ``Downloader``). All talk to the parent over a Pipe.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol import bundle as bundle_mod
from agent.protocol import keys
from agent.protocol.manifest import FORMAT, FORMAT_VERSION, TensorData, model_section
from agent.protocol.topics import Topics
from fleet.broker import BrokerSettings, Layout, render_mosquitto_conf
from fleet.repository import StoredBlob
from tests.support.broker import HOST, Mosquitto

FLEET = "bench"
TOPICS = Topics(FLEET)
PROFILE = "x86-cpu"
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes), sizes in MB too
KiB = 1024
MiB = 1024 * 1024

# The directives of the generated configuration that set limits; everything else in it (TLS,
# ACL, persistence, logging paths) is about security or files, not throughput or loss.
_TUNING = ("set_tcp_nodelay", "max_packet_size", "max_queued_messages", "max_queued_bytes",
           "max_inflight_messages", "message_size_limit")


# --------------------------------------------------------------------------- broker configurations

def project_tuning(chunk_size: int) -> list[str]:
    """The limit lines of the project's generated mosquitto.conf for a fleet using ``chunk_size``."""
    settings = BrokerSettings(fleet=FLEET, chunk_size=chunk_size)
    text = render_mosquitto_conf(settings, Layout(Path(tempfile.gettempdir()) / "lf-bench-unused"))
    return [line for line in text.splitlines() if line.split(" ", 1)[0] in _TUNING]


def project_config(chunk_size: int) -> Callable[[int], str]:
    """``config(port)`` for ``Mosquitto``: the project's limits on a plain anonymous TCP listener."""
    tuning = project_tuning(chunk_size)

    def config(port: int) -> str:
        return "\n".join([f"listener {port} {HOST}", "allow_anonymous true", *tuning]) + "\n"
    return config


def default_config(port: int) -> str:
    """mosquitto's defaults (20 in flight, 1,000 queued per client): just a listener."""
    return f"listener {port} {HOST}\nallow_anonymous true\n"


def start_broker(config: Callable[[int], str], workdir: Path) -> Mosquitto:
    """A started mosquitto on a free port; ``close()`` it when done."""
    return Mosquitto(config, workdir).start()


# --------------------------------------------------------------------------- keys and bundles

@dataclass(frozen=True)
class BenchKeys:
    """A throwaway release key pair; ``dir`` is a trusted-keys directory holding its public half."""

    dir: Path

    @classmethod
    def create(cls, directory: Path) -> "BenchKeys":
        keys.generate("release", directory)
        return cls(directory)

    @property
    def release(self):
        return keys.load_private(self.dir / "release.key")

    def trusted(self) -> list[keys.PublicKey]:
        return keys.load_trusted_dir(self.dir)


def random_model(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes: a stand-in model that is never loaded (fetch only)."""
    import numpy as np
    return np.random.default_rng(seed).bytes(size)


def manifest_doc(model: bytes, chunk_size: int, *, name: str = "bench-model", version: int = 1) -> dict[str, Any]:
    """A valid manifest for ``model`` without an interpreter (the bytes are not a real model)."""
    sample = TensorData("float32", (1, 4), bytes(16)).to_dict()
    spec = {"name": "x", "shape": [1, 4], "dtype": "float32", "quantization": None}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version, "profile": PROFILE,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "min_agent_version": "0.1.0", "producer": {"tool": "bench"},
        "model": model_section(model, chunk_size),
        "inputs": [spec], "outputs": [spec],
        "quantization": {"mode": "float32", "input_type": "float32", "output_type": "float32",
                         "calibration_samples": 0},
        "accelerator": {"target": "cpu", "compiled": False},
        "estimates": {"arena_bytes": 1 << 20, "peak_memory_bytes": len(model) + (1 << 20)},
        "validation": {},
        "smoke_test": {"inputs": [sample], "expected_outputs": [sample], "atol": 1e-4},
    }


def add_random_blob(store: Any, bench_keys: BenchKeys, size: int, chunk_size: int, seed: int) -> StoredBlob:
    """Sign a random model of ``size`` bytes in ``chunk_size`` chunks and put it in a ``BlobStore``;
    return the ``StoredBlob`` (fetch it by ``.blob_id``)."""
    model = random_model(size, seed)
    parts = bundle_mod.parse_bundle(bundle_mod.build(manifest_doc(model, chunk_size), model, bench_keys.release))
    return store.add_parts(parts.manifest_bytes, parts.signature_bytes, parts.model)


def remove_blob(store: Any, blob_id: str) -> None:
    """Free the disk a finished run's blob took (the repository no longer finds it)."""
    shutil.rmtree(store.blobs_dir / blob_id, ignore_errors=True)


# --------------------------------------------------------------------------- TCP_NODELAY what-if

def enable_nodelay() -> None:
    """What-if: every paho client made in this process sets TCP_NODELAY on its socket.

    paho-mqtt 2.2 never sets it, so a small packet (a request, a PUBACK) sent while an earlier
    one is unacknowledged waits for the peer's delayed ACK (Nagle; about 40 ms on Linux).
    agent/mqtt.py and agent/blob_link.py set it on ours; the broker side sets it too
    (``set_tcp_nodelay true``). Benchmarks call this under ``--nodelay``, for the raw clients.
    """
    import socket
    import paho.mqtt.client as paho
    if getattr(paho.Client._create_socket_connection, "_lf_nodelay", False):
        return
    original = paho.Client._create_socket_connection

    def create(self):
        sock = original(self)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    create._lf_nodelay = True  # type: ignore[attr-defined]
    paho.Client._create_socket_connection = create


# --------------------------------------------------------------------------- child processes

def spawn(target: Callable[..., None], *args: Any) -> tuple[multiprocessing.Process, Any]:
    """Start ``target(conn, *args)`` in a fresh interpreter; return (process, parent end of the pipe)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def expect(conn: Any, what: str, timeout: float = 60.0) -> Any:
    """The next message from a child; a clear error if it does not come or reports a failure."""
    if not conn.poll(timeout):
        raise RuntimeError(f"benchmark child did not send {what!r} within {timeout:g}s")
    reply = conn.recv()
    if isinstance(reply, tuple) and reply and reply[0] == "error":
        raise RuntimeError(f"benchmark child failed while waiting for {what!r}: {reply[1]}")
    return reply


def finish(proc: multiprocessing.Process, conn: Any, timeout: float = 30.0) -> None:
    """Ask a child to stop, and terminate it if it does not."""
    try:
        conn.send(("stop",))
    except (BrokenPipeError, OSError):
        pass
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


def repository_main(conn: Any, url: str, store_root: str, keys_dir: str, nodelay: bool = False,
                    gathering: dict[str, float] | None = None) -> None:
    """Child: the real RepositoryService on its own MqttLink (``gathering``: its ``gather_s`` and
    ``start_s`` if not the defaults). Commands: ("stats",), ("requests",), ("stop",)."""
    from agent.mqtt import MqttLink
    from fleet.repository import BlobStore, RepositoryService
    try:
        if nodelay:
            enable_nodelay()
        store = BlobStore(store_root, BenchKeys(Path(keys_dir)).trusted())
        link = MqttLink(url, "litefleet-server", backoff=(0.1, 1.0), clean_start=True)
        service = RepositoryService(link, store, FLEET, **(gathering or {}))
        service.start()
        link.start()
        if not link.wait_connected(15):
            raise RuntimeError(f"repository cannot connect to {url}: {link.last_error}")
        conn.send(("ready", link.protocol_version))
        while True:
            command = conn.recv()
            if command[0] == "stats":
                conn.send(("stats", service.stats))
            elif command[0] == "requests":  # (time, device, head, chunks, published, blob) per request
                conn.send(("requests", [(r.time, r.device_id, r.head, r.chunks, r.published, r.blob)
                                        for r in service.request_log()]))
            elif command[0] == "stop":
                conn.send(("stats", service.stats))
                break
        service.stop()
        link.stop()
    except Exception as exc:  # report it: the parent would otherwise wait for a reply
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def raw_publisher_main(conn: Any, url: str, protocol: str, nodelay: bool = False) -> None:
    """Child: a bare paho publisher. ("publish", topic, size, count) -> ("done", seconds for all PUBACKs)."""
    import paho.mqtt.client as paho
    try:
        if nodelay:
            enable_nodelay()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{os.getpid()}",
                             protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311)
        acked = threading.Semaphore(0)
        client.on_publish = lambda *_args: acked.release()
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        client.connect(host, int(port))
        client.loop_start()
        conn.send(("ready",))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, topic, size, count = command
            payload = os.urandom(size)
            start = time.perf_counter()
            for _ in range(count):
                client.publish(topic, payload, qos=1)
            for _ in range(count):
                if not acked.acquire(timeout=120):
                    raise RuntimeError("the broker did not acknowledge every raw message within 120 s")
            conn.send(("done", time.perf_counter() - start))
        client.loop_stop()
        client.disconnect()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@dataclass
class SimDevice:
    """One simulated device: its main link, downloader and state directory (fetch only, never installs)."""

    name: str
    link: Any
    downloader: Any
    state_dir: Path


def make_device(url: str, name: str, state_dir: Path, trusted: list, **downloader_args: Any) -> SimDevice:
    """A device as the agent builds it (agent/transport.py): a main MqttLink, and a Downloader over a
    BlobLink of its own; a real ModelStore and Installer, so the manifest's signature is really checked."""
    from agent.blob_link import BlobLink
    from agent.installer import Installer
    from agent.mqtt import MqttLink
    from agent.protocol import profiles
    from agent.store import ModelStore
    from agent.transfer import Downloader
    installer = Installer(ModelStore(state_dir), trusted, profiles.load_profile(PROFILE))
    link = MqttLink(url, name, backoff=(0.1, 1.0), clean_start=True)
    stream = BlobLink(url, f"{name}.blob", protocol=lambda: link.protocol_version, backoff=(0.1, 1.0))
    downloader = Downloader(stream, TOPICS, name, state_dir, installer, **downloader_args)
    return SimDevice(name, link, downloader, state_dir)


def devices_main(conn: Any, url: str, names: list[str], root: str, keys_dir: str, nodelay: bool = False) -> None:
    """Child: N devices. ("fetch", blob, window, timeout) fetches on all at once -> ("done", results).

    Each result is (name, seconds or None, error or "", re-requested chunks), timed from the command's arrival.
    """
    try:
        if nodelay:
            enable_nodelay()
        trusted = BenchKeys(Path(keys_dir)).trusted()
        devices = [make_device(url, name, Path(root) / name, trusted) for name in names]
        for device in devices:
            device.link.start()
        deadline = time.monotonic() + 60
        for device in devices:
            if not device.link.wait_connected(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"device {device.name} cannot connect to {url}: {device.link.last_error}")
        conn.send(("ready",))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, blob, window, timeout_s = command
            start = time.perf_counter()
            results: list[tuple] = []
            lock = threading.Lock()

            def fetch(device: SimDevice) -> None:
                device.downloader.last_plan = None
                try:
                    device.downloader.fetch(blob, window=window, timeout_s=timeout_s)
                    outcome = (device.name, time.perf_counter() - start, "")
                except Exception as exc:
                    outcome = (device.name, None, f"{type(exc).__name__}: {exc}")
                plan = device.downloader.last_plan
                outcome += (plan.rerequests if plan is not None else 0,)
                device.downloader.discard(blob)
                with lock:
                    results.append(outcome)

            threads = [threading.Thread(target=fetch, args=(d,), daemon=True) for d in devices]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            conn.send(("done", results))
        for device in devices:
            device.link.stop()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
