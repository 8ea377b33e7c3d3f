"""Encrypted bundles end to end: real agent processes with their own X25519 keys, a real mosquitto
running the project's generated TLS + ACL configuration, the repository service and telemetry ingest
in-process on the server identity (the parts `litefleet server` composes) with the HTTP API over a
real SQLite store, and the operator's real CLIs: `litefleet fleet keys --json`, `litefleet bundle
encrypt`, `litefleet push --wait`.

Two devices start on an encrypted v1 (the factory image, sealed for both). The operator lists the
devices' keys from their birth messages, encrypts v2 for one group only and pushes it:
- the recipient fetches it over MQTT, rejects one ciphertext chunk that the repository corrupts on
  the way (caught by its signed hash, asked for again), installs and serves v2, and serves it again
  after a restart (decrypted at every load); no file in its state directory holds the plaintext;
- the other device, not a recipient, refuses the deploy at the head with a `deploy_rejected` event
  (`not_recipient`), fetches no chunk, and keeps serving v1.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request

import pytest

from agent.installer import Installer
from agent.mqtt import MqttLink, TlsFiles
from agent.protocol import bundle as bundle_mod
from agent.protocol import encryption, keys, profiles
from agent.store import ModelStore
from fleet import broker as broker_mod
from fleet.api import ApiServer, ServerApi
from fleet.broker import BrokerSettings, parse_device_spec
from fleet.ingest import Ingestor
from fleet.repository import BlobStore, RepositoryService
from fleet.store import open_store
from tests.conftest import run_cli
from tests.support.agents import AgentProcess, make_device, wait_for
from tests.support.broker import free_port
from tests.support.bundles import make_bundle, manifest_for
from tests.test_encryption import files_with_plaintext
from tests.test_mqtt_e2e import FLEET, GeneratedMosquitto, Watcher, predict_ok   # Watcher follows FLEET's topics

PROFILE = "x86-cpu"
CHUNK = 2048
DEVICES = {"enc-a": "ga", "enc-b": "gb"}     # device -> its group
RUN_AS = "root" if os.geteuid() == 0 else ""
TAMPERED_CHUNK = 3


class TamperingLink:
    """The repository's real link; the first time chunk ``index`` of ``blob`` goes out, one of its
    bytes is flipped (a hostile repository or broker), later copies are intact."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.target: tuple[str, int] | None = None
        self.done = threading.Event()

    def arm(self, blob: str, index: int) -> None:
        self.target = (blob, index)
        self.done.clear()

    def publish(self, topic, payload, **kwargs):
        target = self.target
        if target is not None and str(topic).endswith(f"/blob/{target[0]}/chunks") and payload[4:5] == b"\x00" \
                and int.from_bytes(payload[5:9], "big") == target[1]:
            self.target = None
            payload = payload[:13 + 100] + bytes([payload[13 + 100] ^ 0xFF]) + payload[13 + 101:]
            self.done.set()
        return self.link.publish(topic, payload, **kwargs)

    def __getattr__(self, name):
        return getattr(self.link, name)


@pytest.fixture(scope="module")
def env(tmp_path_factory, keys_dir, release_key, digits_tflite_float, digits_tflite_int8):
    root = tmp_path_factory.mktemp("enc-e2e")
    settings = BrokerSettings(FLEET, port=free_port(), run_as=RUN_AS, chunk_size=4 * 1024 * 1024)
    layout = broker_mod.generate(root / "broker", settings,
                                 [parse_device_spec(f"{d}:{g}@{PROFILE}") for d, g in DEVICES.items()]).layout
    mosq = GeneratedMosquitto(layout, settings)
    mosq.start()

    def tls(identity: str) -> TlsFiles:
        return TlsFiles(str(layout.ca_cert), str(layout.client_cert(identity)), str(layout.client_key(identity)))

    repo_link = MqttLink(mosq.url, "litefleet-server", tls=tls("litefleet-server"), backoff=(0.1, 1.0))
    ingest_link = MqttLink(mosq.url, "litefleet-server-ingest", tls=tls("litefleet-server"), backoff=(0.1, 1.0))
    watch_link = MqttLink(mosq.url, "enc-watcher", tls=tls("operator"), backoff=(0.1, 1.0))
    tampering = TamperingLink(repo_link)
    repo = BlobStore(root / "repo", keys.load_trusted_dir(keys_dir))
    service = RepositoryService(tampering, repo, FLEET)
    service.start()
    store = open_store(str(root / "fleet.db"))
    store.migrate()
    ingestor = Ingestor(ingest_link, store, FLEET, share_group=None, flush_ms=100)
    ingestor.start()
    links = (repo_link, ingest_link, watch_link)
    for link in links:
        link.start()
    assert all(link.wait_connected(10) for link in links), mosq.log[-2000:]
    watcher = Watcher(watch_link)
    token = "enc-e2e-token"
    api = ApiServer(ServerApi(store, token), port=0).start()
    (root / "api-token").write_text(token)

    # the publisher's owner key, and each device's own key (what `litefleet-agent install` makes)
    keys.generate_x25519(root / "owner", "owner")
    devices = {}
    for device_id, group in DEVICES.items():
        private_path, _ = keys.generate_x25519(root / device_id / "keys", "device")
        devices[device_id] = make_device(
            root / device_id, keys_dir, device_id=device_id, fleet=FLEET, groups=(group,), telemetry_interval_s=1.0,
            extra=f'x25519_key_file = "{private_path}"\n',
            broker=(f'url = "{mosq.url}"\nca_file = "{layout.ca_cert}"\n'
                    f'cert_file = "{layout.client_cert(device_id)}"\nkey_file = "{layout.client_key(device_id)}"\n'))
    device_keys = {d: keys.load_x25519_private(devices[d].root / "keys" / "device.x25519.key") for d in DEVICES}

    # v1, the factory image: the float digits model sealed for both devices, installed locally
    v1_doc, v1_sealed = encryption.encrypt(
        manifest_for(digits_tflite_float, version=1, chunk_size=CHUNK), digits_tflite_float,
        [keys.Recipient(d, k.public_key()) for d, k in device_keys.items()])
    v1 = bundle_mod.write_bundle(root / "v1-enc.lfb", bundle_mod.build(v1_doc, v1_sealed, release_key))
    for device_id, device in devices.items():
        result = Installer(ModelStore(device.state), keys.load_trusted_dir(keys_dir), profiles.load_profile(PROFILE),
                           decryption_key=device_keys[device_id]).install_file(v1)
        assert result.ok, result.message
        result.loaded.close()
    v2_plain = make_bundle(root / "digits-v2.lfb", digits_tflite_int8, release_key, version=2, mode="int8",
                           chunk_size=CHUNK)
    env = dict(root=root, mosq=mosq, layout=layout, repo=repo, service=service, tampering=tampering, store=store,
               watcher=watcher, api=api, devices=devices, device_keys=device_keys, v2_plain=v2_plain)
    try:
        yield env
    finally:
        api.stop()
        ingestor.stop()
        service.stop()
        for link in links:
            link.stop(2)
        store.close()
        mosq.close()


def api_keys(env) -> dict:
    request = urllib.request.Request(f"{env['api'].url}/api/v1/keys", headers={"Authorization": "Bearer enc-e2e-token"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_an_encrypted_bundle_installs_on_its_recipient_only_and_never_lands_on_disk_in_the_clear(
        env, keys_dir, digits, digits_tflite_float, digits_tflite_int8):
    devices, watcher, root = env["devices"], env["watcher"], env["root"]
    agents = {d: AgentProcess(device) for d, device in devices.items()}
    try:
        for agent in agents.values():
            agent.wait_serving()
        # each birth message carries the device's public key, and the fleet server keeps it
        for device_id, key in env["device_keys"].items():
            b64 = keys.x25519_b64(key.public_key())
            wait_for(lambda: any(d["state"] == "online" and d.get("public_keys", {}).get("x25519") == b64
                                 for d in watcher.docs("status", device_id)), 60, f"the birth of {device_id}")
        wait_for(lambda: len(api_keys(env)["keys"]) == 2, 30, "the fleet server to list both devices' keys")

        # the operator's path: the group's keys from the server, encrypt for them (and the owner), push
        listed = run_cli("fleet", "keys", "--json", "--group", "ga", "--server", env["api"].url,
                         "--token-file", str(root / "api-token"))
        assert listed.returncode == 0, listed.stderr
        fleet_keys = root / "keys-ga.json"
        fleet_keys.write_text(listed.stdout)
        doc = json.loads(listed.stdout)
        assert [(k["device_id"], k["key_id"]) for k in doc["keys"]] == \
            [("enc-a", keys.x25519_key_id(env["device_keys"]["enc-a"].public_key()))]
        v2 = root / "digits-v2-enc.lfb"
        sealed = run_cli("bundle", "encrypt", str(env["v2_plain"]), "--encrypt-for", str(fleet_keys),
                         str(root / "owner" / "owner.x25519.pub"), "--sign-key", str(keys_dir / "release.key"),
                         "-o", str(v2), "--json")
        assert sealed.returncode == 0, sealed.stderr
        blob = json.loads(sealed.stdout)["blob"]
        env["tampering"].arm(blob, TAMPERED_CHUNK)

        def push(group: str):
            return run_cli("push", str(v2), "--target", f"group:{group}", "--fleet", FLEET,
                           "--operator-key", str(keys_dir / "operator.key"), "--repo", str(env["repo"].root),
                           "--trust", str(keys_dir), "--broker", env["mosq"].url, "--ca", str(env["layout"].ca_cert),
                           "--cert", str(env["layout"].client_cert("operator")),
                           "--key", str(env["layout"].client_key("operator")), "--wait", "--timeout", "60s",
                           timeout=120)

        pushed = push("ga")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "enc-a installed" in pushed.stdout, pushed.stdout
        assert env["tampering"].done.is_set(), "the repository never sent the chunk it was to corrupt"
        events = watcher.events("enc-a")
        rejected = [e for e in events if e["kind"] == "deploy_progress" and e["details"].get("step") == "chunk_rejected"]
        assert rejected and f"chunk {TAMPERED_CHUNK}" in rejected[0]["reason"], [e["reason"] for e in events]
        assert predict_ok(devices["enc-a"], digits) == 2

        # the device that is no recipient refuses at the head, fetches nothing, and keeps its model
        refused = push("gb")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        event = watcher.wait_event("enc-b", "deploy_rejected")
        assert event["details"]["code"] == "not_recipient", event
        assert "not a recipient" in event["reason"] and "enc-a" in event["reason"], event["reason"]
        assert not any(r.chunks for r in env["service"].request_log("enc-b", blob)), "a chunk was fetched"
        assert predict_ok(devices["enc-b"], digits) == 1

        # a restart decrypts the stored ciphertext again, in memory
        agents["enc-a"].stop()
        agents["enc-a"] = AgentProcess(devices["enc-a"])
        agents["enc-a"].wait_serving()
        assert predict_ok(devices["enc-a"], digits) == 2
    finally:
        for agent in agents.values():
            agent.stop()
    state = devices["enc-a"].state
    assert (state / "models").is_dir() and any(state.rglob("model.tflite.enc"))
    assert files_with_plaintext(state, digits_tflite_float, digits_tflite_int8) == []
