"""Push, server and repo commands below the end-to-end level: the pure progress table, target
and duration parsing, option errors, and `litefleet server` / `repo add` as real processes
against a plain local mosquitto (TLS and the ACL are covered in tests/test_mqtt_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from agent.mqtt import MqttLink
from agent.protocol import bundle as bundle_mod
from agent.protocol import messages
from agent.protocol.manifest import Manifest
from agent.protocol.topics import Topics
from fleet import push
from tests.conftest import ROOT, run_cli
from tests.support.agents import wait_for
from tests.support.broker import mosquitto, mosquitto_factory  # noqa: F401  (fixtures)
from tests.support.bundles import make_bundle


# --- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("device:dev-1", push.Target("device", "dev-1")), ("group:lab", push.Target("group", "lab")),
    ("profile:x86-cpu", push.Target("profile", "x86-cpu")), ("all", push.Target("all")),
])
def test_targets_parse(text, expected):
    assert push.parse_target(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["dev-1", "devices:x", "group:", "group:a/b", "group:+", "all:x"])
def test_bad_targets_say_the_accepted_forms(text):
    with pytest.raises(ValueError, match="target"):
        push.parse_target(text)


def test_durations():
    assert push.parse_duration("90") == 90 and push.parse_duration("10m") == 600
    assert push.parse_duration("1h") == 3600 and push.parse_duration("1.5s") == 1.5
    with pytest.raises(ValueError, match="10m"):
        push.parse_duration("soon")


def test_seq_is_time_based_and_strictly_increasing():
    a, b = push.next_seq(now=1000.0), push.next_seq(now=1000.0)
    assert a >= 1_000_000_000 and b == a + 1
    assert push.next_seq(now=999.0) > b, "a clock step back never repeats or lowers seq"


def _status(device, groups=(), profile="x86-cpu", state="online"):
    return {"v": 1, "state": state, "device_id": device, "ts": 1.0, "groups": list(groups), "profile": profile}


def _event(device, kind, cid, **details):
    return {"v": 1, "device_id": device, "seq": 1, "ts": 1.0, "kind": kind, "reason": f"{kind} reason",
            "command_id": cid, "details": details}


def test_progress_counts_group_members_and_follows_events_to_the_end():
    p = push.Progress(push.Target("group", "lab"), "c1", "deploy")
    assert p.on_status(_status("a", ["lab"])) and p.on_status(_status("b", ["lab"], state="offline"))
    assert not p.on_status(_status("c", ["other"]))
    assert sorted(p.rows) == ["a", "b"] and not p.done
    assert not p.on_event(_event("a", "installed", "another-command"))
    p.on_event(_event("a", "deploy_accepted", "c1"))
    p.on_event(_event("a", "deploy_progress", "c1", percent=50))
    assert p.rows["a"].state == "fetching" and p.rows["a"].percent == 50
    p.on_event(_event("a", "installed", "c1"))
    assert p.unanswered() == ["b"] and p.exit_code() == push.EXIT_TIMEOUT
    p.on_event(_event("b", "deploy_rejected", "c1", code="not_newer"))
    assert p.done and p.exit_code() == push.EXIT_FAILED
    assert p.rows["b"].detail.startswith("not_newer:")
    p.on_event(_event("b", "installed", "c1"))
    assert p.rows["b"].state == "rejected", "a final state stays final"


def test_progress_for_one_device_knows_it_before_any_status_and_all_ok_is_exit_0():
    p = push.Progress(push.Target("device", "d1"), "c2", "config")
    assert p.unanswered() == ["d1"]
    p.on_event(_event("d1", "config_applied", "c2"))
    assert p.exit_code() == push.EXIT_OK


def test_follow_waits_out_the_settle_time_then_ends():
    import threading
    p = push.Progress(push.Target("device", "d1"), "c", "rollback")
    p.on_event(_event("d1", "rolled_back", "c"))
    ticks = iter([0.0, 0.1, 0.5, 1.2])
    assert push.follow(p, threading.Lock(), threading.Event(), timeout_s=10, settle_s=1.0,
                       clock=lambda: next(ticks)) == push.EXIT_OK
    empty = push.Progress(push.Target("group", "g"), "c", "deploy")
    ticks2 = iter([0.0, 5.0, 11.0])
    assert push.follow(empty, threading.Lock(), threading.Event(), timeout_s=10, settle_s=1.0,
                       clock=lambda: next(ticks2)) == push.EXIT_TIMEOUT


# --- the CLI as a process -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, digits_tflite_float, release_key):
    return make_bundle(tmp_path_factory.mktemp("b") / "v1.lfb", digits_tflite_float, release_key, chunk_size=4096)


def test_push_refuses_a_profile_target_the_bundle_is_not_for(bundle, keys_dir):
    r = run_cli("push", str(bundle), "--target", "profile:rpi4-cpu", "--fleet", "f", "--broker", "mqtt://127.0.0.1:1",
                "--operator-key", str(keys_dir / "operator.key"))
    assert r.returncode == 2 and "built for profile 'x86-cpu'" in r.stderr, r.stderr


def test_push_needs_the_tls_files_for_mqtts_and_trust_for_repo(bundle, keys_dir, tmp_path):
    base = ["push", str(bundle), "--target", "all", "--fleet", "f", "--operator-key", str(keys_dir / "operator.key")]
    r = run_cli(*base, "--broker", "mqtts://127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"))
    assert r.returncode == 2 and "also give --cert, --key" in r.stderr, r.stderr
    r = run_cli(*base, "--broker", "mqtt://127.0.0.1:1", "--repo", str(tmp_path / "repo"))
    assert r.returncode == 2 and "--repo needs --trust" in r.stderr, r.stderr


def test_push_reports_an_unreachable_broker(bundle, keys_dir):
    from tests.support.broker import free_port
    r = run_cli("push", str(bundle), "--target", "all", "--fleet", "f", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                "--operator-key", str(keys_dir / "operator.key"), "--connect-timeout", "1")
    assert r.returncode == 2 and "cannot connect to mqtt://127.0.0.1" in r.stderr, r.stderr


def test_push_publishes_a_retained_signed_deploy(mosquitto, bundle, keys_dir, trusted_keys):
    got: list = []
    topics = Topics("f")
    probe = MqttLink(mosquitto.url, "probe", clean_start=True, session_expiry_s=0)
    r = run_cli("push", str(bundle), "--target", "group:lab", "--fleet", "f", "--broker", mosquitto.url,
                "--operator-key", str(keys_dir / "operator.key"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["topic"] == str(topics.commands("group", "lab")) and doc["exit_code"] == 0
    probe.subscribe(doc["topic"], got.append)      # subscribed after the push: retained
    probe.start()
    try:
        message = wait_for(lambda: got and got[0], 10, "the retained command")
    finally:
        probe.stop(2)
    assert message.retain
    command = json.loads(message.payload)
    body = command["body"]
    manifest = Manifest.parse(bundle_mod.read_bundle(bundle).manifest_bytes)
    assert body["id"] == doc["command_id"] and body["seq"] == doc["seq"] and body["action"] == "deploy"
    manifest_bytes = bundle_mod.read_bundle(bundle).manifest_bytes
    assert body["args"]["blob"] == hashlib.sha256(manifest_bytes).hexdigest() != manifest.sha256
    assert body["args"]["model_sha256"] == manifest.sha256 and body["args"]["profile"] == "x86-cpu"
    assert 3500 < body["expires_at"] - body["issued_at"] <= 3600
    from agent.protocol.commands import CommandGuard, Identity
    guard = CommandGuard(Identity("d", "f", ("lab",), "x86-cpu"))
    assert guard.check(command, trusted_keys).action == "deploy", "a device would accept it"


def test_repo_add_stores_verified_bundles_and_refuses_others(bundle, keys_dir, tmp_path, digits_tflite_float):
    from agent.protocol import keys
    keys.generate("release", tmp_path / "other")
    stranger = make_bundle(tmp_path / "s.lfb", digits_tflite_float, keys.load_private(tmp_path / "other" / "release.key"))
    r = run_cli("repo", "add", str(bundle), str(stranger), "--repo", str(tmp_path / "repo"), "--trust", str(keys_dir),
                "--json")
    assert r.returncode == 1, r.stderr
    results = json.loads(r.stdout)
    assert results[0]["ok"] and not results[1]["ok"] and "not a trusted key" in results[1]["error"]
    assert [p.name for p in (tmp_path / "repo" / "blobs").iterdir()] == [results[0]["blob"]]
    assert results[0]["blob"] == bundle_mod.blob_id(bundle_mod.read_bundle(bundle).manifest_bytes)
    assert results[0]["model_sha256"] == hashlib.sha256(bundle_mod.read_bundle(bundle).model).hexdigest()


def test_server_process_answers_chunk_requests_and_exits_0_on_sigterm(mosquitto, bundle, keys_dir, tmp_path):
    assert run_cli("repo", "add", str(bundle), "--repo", str(tmp_path / "repo"), "--trust", str(keys_dir)).returncode == 0
    sha = bundle_mod.blob_id(bundle_mod.read_bundle(bundle).manifest_bytes)
    server = subprocess.Popen([sys.executable, "-m", "litefleet.cli", "server", "--broker", mosquitto.url, "--fleet", "f",
                               "--repo", str(tmp_path / "repo"), "--trust", str(keys_dir), "--stats-interval", "0.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    topics = Topics("f")
    got: list = []
    device = MqttLink(mosquitto.url, "dev-1", clean_start=True, session_expiry_s=0)
    stream = device.subscribe(str(topics.blob_chunks(sha)), got.append)
    device.start()
    try:
        assert device.wait_connected(10) and stream.wait(10), "the device's subscription to the chunk stream"
        request = messages.encode({"v": 1, "device_id": "dev-1", "blob": sha, "head": True, "chunks": [0]})

        def answered():  # ask again until the server's own subscription is live and both came back
            kinds = {messages.decode_chunk(m.payload, m.topic).kind for m in got}
            if kinds >= {messages.KIND_CHUNK, messages.KIND_HEAD}:
                return True
            device.publish(str(topics.chunk_requests("dev-1")), request).wait(5)
            return False
        wait_for(answered, 30, "the server to send the head and chunk 0", interval=0.3)
    finally:
        device.stop(2)
    server.send_signal(signal.SIGTERM)
    out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    assert "stopped; broker connected; 1 blob(s); requests" in err and "published 1 chunk(s) + 1 head(s)" in err, err


def test_wait_times_out_with_exit_2_naming_the_silent_device(mosquitto, bundle, keys_dir):
    r = run_cli("push", str(bundle), "--target", "device:ghost", "--fleet", "f", "--broker", mosquitto.url,
                "--operator-key", str(keys_dir / "operator.key"), "--wait", "--timeout", "2s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ghost (no status yet) waiting" in r.stdout
    assert "timed out after 2s: no final answer from ghost" in r.stdout, r.stdout
