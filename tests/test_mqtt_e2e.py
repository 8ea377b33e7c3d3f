"""The MQTT link end to end: real agent processes, a real mosquitto running the project's own
generated TLS + ACL configuration (`fleet.broker.generate`), the repository service in-process
on the server identity, and pushes through the real `litefleet` CLI.

One broker, CA and repository per module. Every device has its own group, so the retained
commands one test leaves on the broker never reach another test's device.

Mid-transfer faults are placed deterministically: the repository's link is wrapped so that
publishing a chosen chunk of the blob waits until the test says go (a slow repository, not a
fake one); the broker or the agent is killed while that chunk is held back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.commands.predict import ApiClient
from agent.installer import Installer
from agent.mqtt import MqttLink, TlsFiles
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, messages, profiles
from agent.protocol.commands import make_command
from agent.protocol.manifest import Manifest
from agent.protocol.topics import Topics
from agent.store import ModelStore
from agent.transfer import DEFAULT_WINDOW, DownloadState
from fleet import broker as broker_mod
from fleet.broker import BrokerSettings, Layout, parse_device_spec, render_mosquitto_conf
from fleet.repository import BlobStore, RepositoryService
from tests.conftest import ROOT, run_cli
from tests.support.agents import AgentProcess, Device, make_device, wait_for
from tests.support.broker import Mosquitto, free_port
from tests.support.bundles import make_bundle

FLEET = "e2e"
T = Topics(FLEET)
RUN_AS = "root" if os.geteuid() == 0 else ""
PROFILE = "x86-cpu"
CHUNK = 2048                     # the int8 digits model (~45 KB) is then 23 chunks
BIG = 2 * 1024 * 1024            # the oversized payload
DEVICES = {                      # id -> its own group (retained group commands stay per test)
    "grp-a": "ga", "grp-b": "gb", "off-1": "go", "rej-1": "gr", "bad-1": "gm",
    "ak-1": "gak", "bk-1": "gbk", "tel-1": "gt",
}


class GeneratedMosquitto(Mosquitto):
    """mosquitto running exactly the file `render_mosquitto_conf` returns (as tests/test_broker_acl.py)."""

    def __init__(self, layout: Layout, settings: BrokerSettings) -> None:
        self._settings, self._layout = settings, layout
        super().__init__(lambda port: render_mosquitto_conf(
            dataclasses.replace(self._settings, port=port, bind_address="127.0.0.1"), layout), layout.root / "run")
        self.log_path = layout.log

    def _render(self, port: int) -> str:
        return self._config(port)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"


class GatedLink:
    """The repository's real link; publishing chunk ``index`` of ``blob`` waits for ``release``."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.gate: tuple[str, int] | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def hold(self, blob: str, index: int) -> None:
        self.held.clear()
        self.release.clear()
        self.gate = (str(T.blob_chunks(blob)), index)

    def open(self) -> None:
        self.gate = None
        self.release.set()

    def publish(self, topic, payload, **kwargs):
        gate = self.gate
        if gate is not None and str(topic) == gate[0] and payload[4:5] == b"\x00" \
                and int.from_bytes(payload[5:9], "big") == gate[1]:
            self.gate = None
            self.held.set()
            assert self.release.wait(60), "the test never released the held chunk"
        return self.link.publish(topic, payload, **kwargs)

    def __getattr__(self, name):
        return getattr(self.link, name)


class Watcher:
    """The operator's view of the fleet: every status, event and telemetry message, in order."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.got: list[tuple[str, str, dict]] = []   # (channel, device, doc)
        for channel in ("events", "telemetry", "status"):
            token = link.subscribe(T.all_devices(channel), self._on, qos=1)
            assert token.wait(10), token.refused

    def _on(self, message) -> None:
        channel = message.topic.rsplit("/", 1)[1]
        if not message.payload:
            return
        doc = messages.decode(message.payload, channel, message.topic)
        with self.lock:
            self.got.append((channel, doc["device_id"], doc))

    def docs(self, channel: str, device: str) -> list[dict]:
        with self.lock:
            return [d for c, dev, d in self.got if c == channel and dev == device]

    def events(self, device: str, kind: str | None = None, command_id: str | None = None) -> list[dict]:
        return [e for e in self.docs("events", device) if (kind is None or e["kind"] == kind)
                and (command_id is None or e["command_id"] == command_id)]

    def wait_event(self, device: str, kind: str, command_id: str | None = None, timeout: float = 30) -> dict:
        return wait_for(lambda: (self.events(device, kind, command_id) or [None])[-1], timeout,
                        f"event {kind} from {device}" + (f" for command {command_id}" if command_id else ""))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        token = self.link.publish(topic, payload, qos=1, retain=retain)
        assert token.wait(10) and not token.refused, f"publish on {topic}: {token.refused}"


@dataclasses.dataclass
class Env:
    broker: GeneratedMosquitto
    layout: Layout
    repo_dir: Path
    store: BlobStore
    service: RepositoryService
    gated: GatedLink
    watcher: Watcher
    keys_dir: Path
    v1: Path             # float digits, installed locally before a test
    v2: Path             # int8 digits, pushed over MQTT
    v2_manifest: Manifest
    root: Path

    @property
    def v2_blob(self) -> str:
        """v2's blob id, what a deploy names: the hash of its signed manifest (not of its model)."""
        return bundle_mod.blob_id(bundle_mod.read_bundle(self.v2).manifest_bytes)

    def tls(self, identity: str) -> TlsFiles:
        return TlsFiles(str(self.layout.ca_cert), str(self.layout.client_cert(identity)),
                        str(self.layout.client_key(identity)))

    def tls_args(self, identity: str = "operator") -> list[str]:
        return ["--broker", self.broker.url, "--ca", str(self.layout.ca_cert),
                "--cert", str(self.layout.client_cert(identity)), "--key", str(self.layout.client_key(identity))]

    def device(self, device_id: str, *, preinstall: bool = True, telemetry_interval_s: float = 1.0) -> Device:
        d = make_device(self.root / device_id, self.keys_dir, device_id=device_id, fleet=FLEET,
                        groups=(DEVICES[device_id],), telemetry_interval_s=telemetry_interval_s, broker=(
                            f'url = "{self.broker.url}"\nca_file = "{self.layout.ca_cert}"\n'
                            f'cert_file = "{self.layout.client_cert(device_id)}"\n'
                            f'key_file = "{self.layout.client_key(device_id)}"\n'))
        if preinstall:
            installer = Installer(ModelStore(d.state), keys.load_trusted_dir(self.keys_dir),
                                  profiles.load_profile(PROFILE))
            result = installer.install_file(self.v1)
            assert result.ok, result.message
            result.loaded.close()
        return d

    def command(self, action: str, args: dict, device_id: str, *, key=None, ttl_s: float = 600,
                scope: str = "group") -> dict:
        name = DEVICES[device_id] if scope == "group" else device_id
        return make_command(action, args, fleet=FLEET, scope=scope, name=name, seq=int(time.time() * 1e6),
                            operator_key=key or keys.load_private(self.keys_dir / "operator.key"), ttl_s=ttl_s)

    def deploy_v2(self, device_id: str, **kwargs) -> dict:
        m = self.v2_manifest
        return self.command("deploy", {"blob": self.v2_blob, "name": m.name, "version": m.version,
                                       "profile": m.profile}, device_id, **kwargs)

    def send(self, command: dict, device_id: str, retain: bool = False) -> str:
        scope = command["body"]["target"]["scope"]
        topic = str(T.commands(scope, command["body"]["target"]["name"] if scope != "all" else ""))
        self.watcher.publish(topic, messages.encode(command), retain=retain)
        return command["body"]["id"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, keys_dir, release_key, digits_tflite_float, digits_tflite_int8):
    root = tmp_path_factory.mktemp("e2e")
    settings = BrokerSettings(FLEET, port=free_port(), run_as=RUN_AS, chunk_size=4 * 1024 * 1024)
    specs = [parse_device_spec(f"{d}:{g}@{PROFILE}") for d, g in DEVICES.items()]
    layout = broker_mod.generate(root / "broker", settings, specs).layout
    mosq = GeneratedMosquitto(layout, settings)
    mosq.start()
    other = root / "other-keys"
    keys.generate("release", other)
    trusted = keys.load_trusted_dir(keys_dir) + [keys.load_public(other / "release.pub")]
    store = BlobStore(root / "repo", trusted)
    server_link = MqttLink(mosq.url, "litefleet-server", tls=TlsFiles(
        str(layout.ca_cert), str(layout.client_cert("litefleet-server")), str(layout.client_key("litefleet-server"))),
        backoff=(0.1, 1.0))
    gated = GatedLink(server_link)
    service = RepositoryService(gated, store, FLEET)
    service.start()
    server_link.start()
    watch_link = MqttLink(mosq.url, "e2e-watcher", clean_start=False, session_expiry_s=3600, backoff=(0.1, 1.0),
                          tls=TlsFiles(str(layout.ca_cert), str(layout.client_cert("operator")),
                                       str(layout.client_key("operator"))))
    watch_link.start()
    assert server_link.wait_connected(10) and watch_link.wait_connected(10), mosq.log[-2000:]
    watcher = Watcher(watch_link)
    v1 = make_bundle(root / "v1.lfb", digits_tflite_float, release_key, version=1, chunk_size=CHUNK)
    v2 = make_bundle(root / "v2.lfb", digits_tflite_int8, release_key, version=2, mode="int8", chunk_size=CHUNK)
    v2_manifest = Manifest.parse(bundle_mod.read_bundle(v2).manifest_bytes)
    env = Env(mosq, layout, root / "repo", store, service, gated, watcher, keys_dir, v1, v2, v2_manifest, root)
    env.other_key = keys.load_private(other / "release.key")  # type: ignore[attr-defined]
    try:
        yield env
    finally:
        gated.open()
        service.stop()
        server_link.stop(2)
        watch_link.stop(2)
        mosq.close()


@pytest.fixture(autouse=True)
def open_gate(env):
    """A test that failed while holding a chunk back must not stall the next one."""
    yield
    env.gated.open()


@pytest.fixture
def agents():
    started: list[AgentProcess] = []

    def start(device: Device) -> AgentProcess:
        agent = AgentProcess(device)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.stop()


def online(env: Env, device_id: str, version: int | None = None, timeout: float = 60) -> dict:
    """Wait for a birth message of ``device_id`` (with ``version`` active, when given)."""
    def born():
        for doc in reversed(env.watcher.docs("status", device_id)):
            if doc["state"] == "online":
                active = doc.get("active_model") or {}
                if version is None or active.get("version") == version:
                    return doc
            return None
    return wait_for(born, timeout, f"a birth of {device_id}" + (f" with v{version} active" if version else ""))


def predict_ok(device: Device, digits) -> int:
    _, _, x_test, _ = digits
    doc = ApiClient(unix_socket=str(device.socket)).json(
        "POST", "/v1/models/digits:predict", json.dumps({"instances": [x_test[0].tolist()]}).encode(),
        {"Content-Type": "application/json"})
    assert len(doc["predictions"][0]) == 10
    return int(doc["model_version"])


def retained_status(env: Env, device_id: str) -> dict:
    """The retained status message as a NEW subscriber gets it from the broker."""
    got: list[dict] = []
    link = MqttLink(env.broker.url, f"probe-{device_id}", clean_start=True, session_expiry_s=0, tls=env.tls("operator"))
    link.subscribe(str(T.status(device_id)), lambda m: got.append(json.loads(m.payload)), qos=1)
    link.start()
    try:
        return wait_for(lambda: got and got[-1], 10, f"the retained status of {device_id}")
    finally:
        link.stop(2)


# --- tests ---------------------------------------------------------------------------------------------


def test_push_to_a_group_installs_on_its_device_only(env, agents, digits):
    a, b = env.device("grp-a"), env.device("grp-b")
    agent_a, agent_b = agents(a), agents(b)
    online(env, "grp-a", 1)
    online(env, "grp-b", 1)

    pushed = run_cli("push", str(env.v2), "--target", "group:ga", "--fleet", FLEET,
                     "--operator-key", str(env.keys_dir / "operator.key"), "--repo", str(env.repo_dir),
                     "--trust", str(env.keys_dir), *env.tls_args(), "--wait", "--timeout", "60s", timeout=120)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    out = pushed.stdout
    assert "grp-a installed" in out and "1 of 1 device(s) done" in out, out
    assert "grp-b" not in out
    command_id = out.split(" as command ", 1)[1].split()[0]

    installed = env.watcher.wait_event("grp-a", "installed", command_id)
    assert installed["details"]["version"] == 2
    kinds = [e["kind"] for e in env.watcher.events("grp-a", command_id=command_id)]
    assert kinds[0] == "deploy_accepted" and "deploy_progress" in kinds and kinds[-1] == "installed", kinds
    assert predict_ok(a, digits) == 2
    assert predict_ok(b, digits) == 1, "the other group's device kept its model"
    assert not env.watcher.events("grp-b", command_id=command_id)
    assert (b.status()["model"] or {})["version"] == 1

    birth = retained_status(env, "grp-a")
    assert birth["state"] == "online" and birth["active_model"]["version"] == 2
    assert birth["active_model"]["sha256"] == env.v2_manifest.sha256 and birth["groups"] == ["ga"]
    assert retained_status(env, "grp-b")["active_model"]["version"] == 1

    wait_for(lambda: len(env.watcher.docs("telemetry", "grp-a")) >= 2, 20, "telemetry from grp-a")
    seqs = [d["seq"] for d in env.watcher.docs("telemetry", "grp-a")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert "inference" in env.watcher.docs("telemetry", "grp-a")[-1]["data"]
    for agent in (agent_a, agent_b):
        assert agent.stop() == 0, agent.log()


def test_an_offline_device_installs_the_deploy_when_it_starts(env, agents):
    device = env.device("off-1")
    env.store.add_bundle(env.v2)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "litefleet.cli", "push", str(env.v2), "--target", "device:off-1", "--fleet", FLEET,
         "--operator-key", str(env.keys_dir / "operator.key"), *env.tls_args(), "--wait", "--timeout", "90s",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        # the command is on the broker (retained) before the device exists on the network
        wait_for(lambda: _retained_command(env, "off-1"), 30,
                 "the retained deploy command on device/off-1/cmd")
        assert not env.watcher.docs("status", "off-1"), "the device has never been online"
        agents(device)
        online(env, "off-1", 2, timeout=60)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, out + err
    doc = json.loads(out)
    assert doc["devices"][0]["device_id"] == "off-1" and doc["devices"][0]["state"] == "installed"
    assert device.status()["model"]["version"] == 2


def _retained_command(env: Env, device_id: str) -> dict | None:
    got: list[bytes] = []
    # the operator may not read device commands (ACL): read them as the device would
    link = MqttLink(env.broker.url, f"probe-cmd-{device_id}", clean_start=True, session_expiry_s=0,
                    tls=env.tls(device_id))
    token = link.subscribe(str(T.commands("device", device_id)), lambda m: got.append(m.payload), qos=1)
    link.start()
    try:
        token.wait(5)
        wait_for(lambda: got, 3, "a retained command")
    except AssertionError:
        return None
    finally:
        link.stop(2)
    return json.loads(got[-1])


def test_replayed_expired_badly_signed_and_wrong_profile_commands_are_rejected(env, agents, digits, tmp_path,
                                                                               digits_tflite_float):
    device = env.device("rej-1")
    agent = agents(device)
    online(env, "rej-1", 1)
    env.store.add_bundle(env.v2)

    good = env.deploy_v2("rej-1")
    env.send(good, "rej-1")
    env.watcher.wait_event("rej-1", "installed", good["body"]["id"])

    def rejected(command: dict, code: str) -> dict:
        cid = env.send(command, "rej-1")
        event = env.watcher.wait_event("rej-1", "deploy_rejected", cid)
        assert event["details"]["code"] == code, event
        return event

    replay = rejected(good, "replayed")                       # the exact same signed payload again
    assert "already accepted" in replay["reason"]
    rejected(env.deploy_v2("rej-1", ttl_s=-5), "expired")
    bad = rejected(env.deploy_v2("rej-1", key=keys.load_private(env.keys_dir / "release.key")), "bad_signature")
    assert "operator" in bad["reason"] or "role" in bad["reason"] or "trusted" in bad["reason"], bad["reason"]
    m = env.v2_manifest
    wrong = rejected(env.command("deploy", {"blob": env.v2_blob, "name": m.name, "version": 3,
                                            "profile": "rpi4-cpu"}, "rej-1"), "wrong_profile")
    assert "rpi4-cpu" in wrong["reason"]

    # a bundle signed by a release key the device does not trust: refused at the head
    unknown = make_bundle(tmp_path / "unknown.lfb", digits_tflite_float, env.other_key, version=7, chunk_size=CHUNK)
    um = env.store.add_bundle(unknown)
    cid = env.send(env.command("deploy", {"blob": um.blob_id, "name": um.manifest.name,
                                          "version": um.manifest.version, "profile": um.manifest.profile},
                               "rej-1"), "rej-1")
    refusal = env.watcher.wait_event("rej-1", "deploy_rejected", cid)
    assert refusal["details"]["code"] == "bad_signature" and "not a trusted key" in refusal["reason"], refusal
    assert not any(r.chunks for r in env.service.request_log("rej-1", um.blob_id)), "no chunk was fetched"
    assert predict_ok(device, digits) == 2, "still serving the installed model"
    assert agent.proc.poll() is None


MALFORMED = [b"\x00\xff\xfegarbage\x80", b"{not json", json.dumps({"v": 1, "hello": "world"}).encode(),
             b"{" + b" " * BIG + b"}"]


def test_malformed_and_oversized_messages_are_dropped_and_the_agent_keeps_serving(env, agents, digits):
    device = env.device("bad-1")
    agent = agents(device)
    online(env, "bad-1", 1)
    env.store.add_bundle(env.v2)
    topics = [str(T.commands("device", "bad-1")), str(T.commands("group", "gm")),
              str(T.commands("profile", PROFILE)), str(T.commands("all"))]
    for topic in topics:
        for payload in MALFORMED:
            env.watcher.publish(topic, payload)
    wait_for(lambda: sum(agent.log().count(f"dropped a malformed command on {t}") for t in topics) == 16, 20,
             "16 log lines about dropped commands:\n" + agent.log()[-3000:])
    log = agent.log()
    assert "not valid JSON" in log and "over the 1048576-byte message limit" in log
    assert predict_ok(device, digits) == 1

    # the blob stream, during a transfer, written by the server identity (the only one allowed to)
    m = env.v2_manifest
    env.gated.hold(env.v2_blob, 2)
    cid = env.send(env.deploy_v2("bad-1"), "bad-1")
    assert env.gated.held.wait(30), "the transfer started"
    rogue = MqttLink(env.broker.url, "rogue-server", clean_start=True, session_expiry_s=0,
                     tls=env.tls("litefleet-server"))
    rogue.start()
    try:
        assert rogue.wait_connected(10)
        stream = str(T.blob_chunks(env.v2_blob))
        count = len(m.chunks)
        bad_chunks = [messages.encode_chunk(3, count, b"\x00" * BIG)]           # 2 MB, wrong hash
        for payload in MALFORMED + bad_chunks:
            assert rogue.publish(stream, payload).wait(10)
    finally:
        rogue.stop(2)
    wait_for(lambda: agent.log().count(f"ignored a malformed message on {stream}") >= 4, 20,
             "log lines about the malformed chunk messages:\n" + agent.log()[-3000:])
    env.gated.open()
    env.watcher.wait_event("bad-1", "installed", cid, timeout=60)
    assert "chunk 3 of digits v2 failed its sha256" in agent.log()
    assert predict_ok(device, digits) == 2
    assert agent.proc.poll() is None


def _verified_on_disk(part: Path, manifest) -> set[int]:
    """Chunks of ``part`` that match the manifest, read without touching the file."""
    try:
        data = part.read_bytes()
    except FileNotFoundError:
        return set()
    size = manifest.chunk_size
    return {i for i, expected in enumerate(manifest.chunks)
            if hashlib.sha256(data[i * size:(i + 1) * size]).hexdigest() == expected}


def test_an_agent_killed_mid_transfer_resumes_asking_only_for_missing_chunks(env, agents):
    device = env.device("ak-1")
    first = agents(device)
    online(env, "ak-1", 1)
    env.store.add_bundle(env.v2)
    m = env.v2_manifest
    env.gated.hold(env.v2_blob, len(m.chunks) // 2)
    env.send(env.deploy_v2("ak-1"), "ak-1", retain=True)
    assert env.gated.held.wait(30)
    # The repository reaching the held chunk does not mean the agent has written the ones before it.
    wait_for(lambda: _verified_on_disk(device.state / "downloads" / env.v2_blob / DownloadState.PART, m), 30,
             "the agent to write the first chunks to disk")
    first.kill()                                           # SIGKILL mid-transfer
    killed_at = time.monotonic()
    state = DownloadState(device.state / "downloads", env.v2_blob)
    on_disk = state.open(m)
    state.close()
    assert 0 < len(on_disk) < len(m.chunks), on_disk
    assert (device.state / "pending_deploy.json").exists()

    heads = env.service.stats["heads_published"]
    agents(device)
    env.gated.open()
    wait_for(lambda: (device.status().get("model") or {}).get("version") == 2, 60,
             "the restarted agent to finish the deploy")
    later = [r for r in env.service.request_log("ak-1", env.v2_blob) if r.time > killed_at]
    asked = {i for r in later for i in r.chunks}
    assert asked and not asked & on_disk, f"asked again for chunks on disk: {sorted(asked & on_disk)}"
    # The verified head was kept on disk: never asked for alone (a head flag with chunks only tells
    # the repository that the new connection's stream subscription is new), and not sent again.
    assert all(r.chunks for r in later if r.head), [(r.head, r.chunks) for r in later]
    assert env.service.stats["heads_published"] == heads
    wait_for(lambda: not (device.state / "pending_deploy.json").exists(), 30,
             "the finished deploy to be cleared from the state directory")


def test_a_broker_killed_mid_transfer_and_restarted_the_transfer_completes(env, agents):
    device = env.device("bk-1")
    agent = agents(device)
    online(env, "bk-1", 1)
    env.store.add_bundle(env.v2)
    m = env.v2_manifest
    env.gated.hold(env.v2_blob, len(m.chunks) // 2)
    env.send(env.deploy_v2("bk-1"), "bk-1", retain=True)
    assert env.gated.held.wait(30)
    connects = agent.log().count("connected to mqtts://")
    env.broker.restart(kill=True)                          # SIGKILL, then start again on the same port
    wait_for(lambda: agent.log().count("connected to mqtts://") > connects, 30, "the agent to reconnect")
    env.gated.open()
    wait_for(lambda: (device.status().get("model") or {}).get("version") == 2, 60, "the install after the restart")
    counts: dict[int, int] = {}
    for record in env.service.request_log("bk-1", env.v2_blob):
        for i in record.chunks:
            counts[i] = counts.get(i, 0) + 1
    again = sorted(i for i, n in counts.items() if n > 1)
    assert len(again) <= DEFAULT_WINDOW, f"re-requested more than one window ({DEFAULT_WINDOW}): {again}"
    assert set(counts) == set(range(len(m.chunks)))
    assert agent.proc.poll() is None


def test_telemetry_spooled_while_the_broker_is_down_arrives_without_gaps(env, agents):
    device = env.device("tel-1", preinstall=False, telemetry_interval_s=0.2)
    agent = agents(device)
    online(env, "tel-1")

    def seqs() -> list[int]:
        return [d["seq"] for ch in ("telemetry", "events") for d in env.watcher.docs(ch, "tel-1")]

    wait_for(lambda: len(seqs()) >= 3, 20, "telemetry before the outage")
    before = max(seqs())
    env.broker.stop()                                      # SIGTERM: sessions are saved
    wait_for(lambda: (device.status().get("telemetry") or {}).get("spool", {}).get("pending", 0) >= 5, 30,
             "telemetry to pile up in the spool while the broker is down")
    env.broker.start()
    wait_for(lambda: any(d["seq"] > before + 5 and d["data"]["spool"]["pending"] == 0
                         for d in env.watcher.docs("telemetry", "tel-1")), 30,
             "telemetry from after the outage saying the spool is empty")
    got = set(seqs())
    first, last = min(got), max(got)
    missing = sorted(set(range(first, last + 1)) - got)
    assert not missing, f"lost seqs {missing}"
    assert last > before + 5
    assert agent.proc.poll() is None
