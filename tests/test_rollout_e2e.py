"""Staged rollouts end to end: real agent processes serving real inferences, a real mosquitto,
the repository service, telemetry ingest into a real SQLite store, the rollout runner and the
HTTP API in-process (the parts `litefleet server` composes), and `litefleet rollout` as a real CLI.

Four devices run digits v1 and serve a steady stream of local inference requests (one load
thread per device), so their telemetry carries real latencies. The tests run in order on the
same fleet:
1. a good model (v2: the digits model again) goes to 100% stage by stage;
2. a model that converts fine and passes its smoke test but is slow on these devices (v3: a
   wide CNN, ~20x the digits model's latency) stops at stage 1 on the health rule and that
   one device is rolled back by a signed rollback command, the others never see v3;
3. a model that fails its smoke test (v4, wrong expected output) never activates anywhere: the
   rollout stops on install failures at stage 1 and nothing needs rolling back.

The agents' own health watch is given a very high latency bound so that the *server's* rule is
what stops the slow model (the agent-side watch has its own tests).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.commands.predict import ApiClient
from agent.mqtt import MqttLink
from agent.protocol import keys, messages
from agent.protocol.topics import Topics
from fleet.api import ApiServer, ServerApi
from fleet.api_rollouts import MountedApi, RolloutApi
from fleet.repository import BlobStore, RepositoryService
from fleet.rollout_runner import RolloutRunner
from fleet.rollout_store import RolloutStore
from fleet.store import IngestBatch, open_store
from tests.conftest import run_cli
from tests.support.agents import wait_for
from tests.support.broker import Mosquitto
from tests.support.bundles import make_bundle
from tests.support.rollouts import active_version as agent_version
from tests.support.rollouts import start_agents

FLEET = "ro"
T = Topics(FLEET)
PROFILE = "x86-cpu"
DEVICES = [f"ro-{i}" for i in range(4)]
TELEMETRY_S = 0.5
HEALTH = "p95_latency_ms<=3*baseline,error_rate<1%"


class StoreFeeder:
    """Status, telemetry and events from the broker into the store, in small batches.

    Uses fleet.ingest.Ingestor when it exists; until then this minimal loop (same Store.write_batch
    path, same message decoding) stands in for it.
    """

    def __init__(self, link: MqttLink, store) -> None:
        self.link, self.store = link, store
        self.lock = threading.Lock()
        self.batch = IngestBatch(statuses=[], telemetry=[], events=[])
        self.stop_event = threading.Event()
        try:
            from fleet.ingest import Ingestor
        except ImportError:
            Ingestor = None  # noqa: N806
        self.ingestor = Ingestor(link, store, FLEET, share_group=None, flush_ms=100) if Ingestor else None
        if self.ingestor is None:
            for channel in ("status", "telemetry", "events"):
                assert link.subscribe(T.all_devices(channel), self._on, qos=1).wait(10)
            self.thread = threading.Thread(target=self._flush_loop, daemon=True)
            self.thread.start()
        else:
            self.ingestor.start()

    def _on(self, message) -> None:
        if not message.payload:
            return
        channel = message.topic.rsplit("/", 1)[1]
        try:
            doc = messages.decode(message.payload, channel, message.topic)
        except messages.MessageError:
            return
        with self.lock:
            if channel == "status":
                self.batch.statuses.append((doc["device_id"], doc))
            elif channel == "telemetry":
                self.batch.telemetry.append((doc["device_id"], doc["seq"], doc["ts"], doc["data"]))
            else:
                self.batch.events.append((doc["device_id"], doc["seq"], doc["ts"], doc))

    def _flush_loop(self) -> None:
        while not self.stop_event.wait(0.1):
            with self.lock:
                batch, self.batch = self.batch, IngestBatch(statuses=[], telemetry=[], events=[])
            if batch.statuses or batch.telemetry or batch.events:
                self.store.write_batch(batch)

    def stop(self) -> None:
        if self.ingestor is not None:
            self.ingestor.stop()
        self.stop_event.set()


class Load:
    """Steady local inference traffic on one device (what a camera app would send)."""

    def __init__(self, device, sample: list) -> None:
        self.client = ApiClient(unix_socket=str(device.socket))
        self.body = json.dumps({"instances": [sample]}).encode()
        self.stop_event = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(0.05):   # pacing of a load generator, ~20 requests/s at most
            try:
                self.client.request("POST", "/v1/models/digits:predict", self.body,
                                    {"Content-Type": "application/json"})
            except Exception:  # noqa: BLE001 - the model swaps under load; the agent counts real errors
                self.errors += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


def wide_cnn_tflite(directory: Path) -> bytes:
    """A wide CNN on the digits input: converts and runs fine, but ~20x slower than digits here
    (about 1 G multiply-adds: the 8x8 input upsampled to 32x32, three 192-filter convolutions)."""
    import keras
    from tests.support.models import convert_tflite
    inp = keras.Input((8, 8, 1))
    x = keras.layers.UpSampling2D(4)(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    for _ in range(3):
        x = keras.layers.Conv2D(192, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))
    path = directory / "wide.keras"
    model.save(path)
    return convert_tflite(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory, keys_dir, release_key, digits_tflite_float, digits_tflite_int8, digits):
    root = tmp_path_factory.mktemp("rollout")
    broker = Mosquitto(workdir=root / "broker").start()
    trusted = keys.load_trusted_dir(keys_dir)
    repo = BlobStore(root / "repo", trusted)
    store = open_store(str(root / "fleet.db"))
    store.migrate()
    links = []

    def link(name: str) -> MqttLink:
        lk = MqttLink(broker.url, name, backoff=(0.1, 1.0))
        links.append(lk)
        return lk

    server_link, ingest_link = link("ro-server"), link("ro-ingest")
    service = RepositoryService(server_link, repo, FLEET)
    service.start()
    feeder = None
    for lk in links:
        lk.start()
    assert all(lk.wait_connected(10) for lk in links)
    feeder = StoreFeeder(ingest_link, store)
    runner = RolloutRunner(store, server_link, FLEET, keys.load_private(keys_dir / "operator.key"), repo,
                           interval_s=0.5).start()
    token = "t0ken-for-tests"
    api = ApiServer(MountedApi(ServerApi(store, token), RolloutApi(store, fleet=FLEET, blob_store=repo)),
                    port=0).start()
    token_file = root / "api-token"
    token_file.write_text(token)

    bundles = {
        1: make_bundle(root / "v1.lfb", digits_tflite_float, release_key, version=1),
        2: make_bundle(root / "v2.lfb", digits_tflite_float, release_key, version=2),
        3: make_bundle(root / "v3.lfb", wide_cnn_tflite(root), release_key, version=3),
    }
    # v4 is the int8 model with a wrong expected output for its smoke test: it converts, verifies
    # and downloads, then fails on the device.
    wrong = np.tile(np.array([[-128, 127]], dtype=np.int8), (1, 5))
    bundles[4] = make_bundle(root / "v4.lfb", digits_tflite_int8, release_key, version=4, mode="int8",
                             expected=wrong)
    loads = []
    x_test = digits[2] if len(digits) > 2 else digits[0]
    agents = start_agents(root, keys_dir, broker.url, bundles[1], DEVICES, fleet=FLEET, groups=("canary",),
                          profile=PROFILE, telemetry_interval_s=TELEMETRY_S)
    for agent in agents:
        loads.append(Load(agent.device, np.asarray(x_test[0], dtype=np.float32).reshape(8, 8, 1).tolist()))

    class Env:
        pass

    e = Env()
    e.__dict__.update(root=root, broker=broker, store=store, runner=runner, api=api, token_file=token_file,
                      bundles=bundles, agents={a.device.device_id: a for a in agents}, keys_dir=keys_dir,
                      rollouts=RolloutStore(store))
    try:
        yield e
    finally:
        for load in loads:
            load.stop()
        for agent in agents:
            agent.stop()
        runner.stop()
        api.stop()
        if feeder is not None:
            feeder.stop()
        service.stop()
        for lk in links:
            lk.stop(2)
        store.close()
        broker.close()


def active_version(env, device_id: str) -> int | None:
    return agent_version(env.agents[device_id])


def wait_telemetry(env, since: float, samples: int = 4) -> None:
    """Every device has reported `samples` telemetry intervals with traffic since `since`."""
    def enough():
        for d in DEVICES:
            rows = [r for r in env.store.telemetry(d, since=since, resolution="raw") if (r.get("count") or 0) > 0]
            if len(rows) < samples:
                return False
        return True
    wait_for(enough, 60, f"{samples} telemetry samples with traffic from every device")


def start(env, version: int, rollout_id: str, stages: str, soak: str = "3s") -> None:
    out = run_cli("rollout", "start", str(env.bundles[version]), "--target", "group:canary", "--stages", stages,
                  "--soak", soak, "--max-failures", "0", "--health", HEALTH, "--on-breach", "abort",
                  "--install-timeout", "90s", "--stale-after", "30s", "--min-samples", "4",
                  "--baseline-window", "60s", "--id", rollout_id, "--repo", str(env.root / "repo"),
                  "--trust", str(env.keys_dir), "--server", env.api.url, "--token-file", str(env.token_file))
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"rollout {rollout_id} created" in out.stdout


def wait_final(env, rollout_id: str, timeout: float = 180) -> dict:
    def final():
        state = env.rollouts.load(rollout_id)
        return state if state.state in ("completed", "aborted") else None
    return wait_for(final, timeout, f"rollout {rollout_id} to end (runner: {env.runner.last_error or 'ok'})",
                    interval=0.2).to_dict()


def status_cli(env, rollout_id: str) -> str:
    out = run_cli("rollout", "status", rollout_id, "--server", env.api.url, "--token-file", str(env.token_file))
    return out.stdout + out.stderr


def test_good_model_rolls_out_to_every_device(env):
    wait_telemetry(env, time.time())
    start(env, 2, "good", "1,50%,100%")
    state = wait_final(env, "good")
    assert state["state"] == "completed", state["reason"]
    assert {active_version(env, d) for d in DEVICES} == {2}
    deployed = [d for d in state["devices"] if d["state"] == "installed"]
    assert len(deployed) == 4 and sorted(d["stage"] for d in deployed) == [0, 1, 2, 2]
    text = status_cli(env, "good")
    assert "COMPLETED" in text and "completed: 4 device(s) updated" in text


def test_slow_model_stops_at_the_first_stage_and_is_rolled_back(env):
    wait_telemetry(env, time.time())                 # a fresh baseline on v2
    start(env, 3, "slow", "1,50%,100%", soak="20s")
    state = wait_final(env, "slow")
    assert state["state"] == "aborted", state["reason"]
    assert state["stage"] == 1, json.dumps(state, indent=1)[:6000]
    assert "p95_latency_ms" in state["breach"] and "3 x baseline" in state["breach"]
    (canary,) = [d for d in state["devices"] if d["stage"] == 0]
    assert canary["state"] == "rolled_back"
    assert all(d["state"] == "waiting" for d in state["devices"] if d["stage"] is None)
    wait_for(lambda: {active_version(env, d) for d in DEVICES} == {2}, 30, "every device back on / still on v2")
    events = env.store.events(command_id=canary["rollback_command_id"])
    assert any(e["kind"] == "rolled_back" for e in events)
    text = status_cli(env, "slow")
    assert "ABORTED" in text and "breach: stage 1: health rule" in text


def test_model_failing_its_smoke_test_never_activates(env):
    start(env, 4, "broken", "1,100%")
    state = wait_final(env, "broken")
    assert state["state"] == "aborted", state["reason"]
    assert "1 of 1 device(s) failed" in state["breach"] and "smoke_test_failed" in state["breach"]
    assert {active_version(env, d) for d in DEVICES} == {2}
    assert not [d for d in state["devices"] if d["rollback_command_id"]]
    assert sum(1 for d in state["devices"] if d["command_id"]) == 1
    listed = run_cli("rollout", "list", "--json", "--server", env.api.url, "--token-file", str(env.token_file))
    assert {r["id"]: r["state"] for r in json.loads(listed.stdout)} == {
        "good": "completed", "slow": "aborted", "broken": "aborted"}
