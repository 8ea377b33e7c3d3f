"""The install pipeline with real bundles, real signatures and real interpreters (agent.engine).

Every refusal must leave the previously active model active, loadable and passing its smoke
test, leave no new slot or staging behind, and emit an event whose reason says what to do.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent import events as ev
from agent.engine import load_model, smoke_test
from agent.errors import InstallError
from agent.events import EventLog
from agent.installer import Installer
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, profiles
from agent.protocol.manifest import model_section
from agent.store import ModelStore
from tests.support.bundles import make_bundle, manifest_for


@pytest.fixture(scope="module")
def profile():
    return profiles.load_profile("x86-cpu")


@pytest.fixture(scope="module")
def trusted(keys_dir):
    return keys.load_trusted_dir(keys_dir)


@pytest.fixture
def device(tmp_path, trusted, profile, digits_tflite_float, release_key):
    """A device with v1 (the float digits model) installed, and an installer with an event log."""
    log = EventLog()
    store = ModelStore(tmp_path / "state")
    installer = Installer(store, trusted, profile, events=log)
    result = installer.install_file(make_bundle(tmp_path / "v1.lfb", digits_tflite_float, release_key, version=1))
    assert result.ok, result.message
    result.loaded.close()
    log.events.clear()
    return installer, log, tmp_path


def assert_v1_still_serves(installer: Installer, profile) -> None:
    store = installer.store
    active = store.active()
    assert active is not None and active.manifest.version == 1
    assert store.slots() == [active.slot], "a refused install must leave no slot behind"
    assert list(store.staging_dir.iterdir()) == []
    loaded = load_model(active.read_model(), active.manifest, profile)
    try:
        smoke_test(loaded)
        out = loaded.predict([np.zeros((1, 8, 8, 1), np.float32)])[0]
        assert out.shape == (1, 10)
    finally:
        loaded.close()


def rebuild(path: Path, manifest_bytes: bytes, signature: bytes | None, model: bytes) -> Path:
    """Write a bundle tar from raw parts (for bundles the release tooling would never make)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = [("manifest.json", manifest_bytes), ("manifest.sig", signature), ("model.tflite", model)]
        for name, data in members:
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    return path


def refused(installer, log, path, code) -> str:
    result = installer.install_file(path)
    assert not result.ok and result.code == code, result.message
    assert result.loaded is None
    events = [e for e in log.events if e.kind in (ev.DEPLOY_REJECTED, ev.INSTALL_FAILED)]
    assert events and events[-1].details["code"] == code
    assert events[-1].reason == result.message
    assert ev.INSTALLED not in log.kinds()
    return result.message


# --- success ---------------------------------------------------------------------------------

def test_install_activates_hands_over_and_keeps_previous(tmp_path, trusted, profile, digits_tflite_float,
                                                         digits_tflite_int8, release_key):
    log = EventLog()
    served = []
    installer = Installer(ModelStore(tmp_path / "state"), trusted, profile, events=log, on_activate=served.append)
    first = installer.install_file(make_bundle(tmp_path / "v1.lfb", digits_tflite_float, release_key, version=1))
    assert first.ok and first.code == "installed" and first.loaded is None   # the callback owns it
    second = installer.install_bytes(
        make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2).read_bytes(), "mqtt:deploy-7")
    assert second.ok, second.message
    assert [m.version for m in served] == [1, 2]
    probs = served[1].predict([np.full((1, 8, 8, 1), 0.5, np.float32)])[0]
    assert probs.shape == (1, 10) and probs.dtype == np.float32 and abs(float(probs.sum()) - 1) < 0.05
    store = installer.store
    assert (store.active().manifest.version, store.previous().manifest.version) == (2, 1)
    installed = log.of(ev.INSTALLED)
    assert len(installed) == 2
    assert "installed digits v2" in installed[1].reason and "v1 kept for rollback" in installed[1].reason
    assert installed[1].details["source"] == "mqtt:deploy-7"
    assert installed[1].details["engine"]["delegate"] == "xnnpack"
    for m in served:
        m.close()


def test_rollback_reactivates_the_previous_model(device, profile, digits_tflite_int8, release_key):
    installer, log, tmp_path = device
    ok = installer.install_file(make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2))
    ok.loaded.close()
    result = installer.rollback("p95 latency 80 ms over bound 30 ms")
    assert result.ok and result.code == "rolled_back"
    result.loaded.close()
    event = log.of(ev.ROLLED_BACK)[-1]
    assert "rolled back from v2 to digits v1: p95 latency 80 ms" in event.reason
    assert installer.store.previous() is None
    assert_v1_still_serves(installer, profile)
    again = installer.rollback("again")
    assert not again.ok and again.code == "no_previous"
    assert "no previous model" in log.events[-1].reason


def test_conditional_rollback_only_leaves_the_named_model(device, profile, digits_tflite_int8, release_key):
    installer, log, tmp_path = device
    ok = installer.install_file(make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2))
    ok.loaded.close()
    skipped = installer.rollback("rollout r1 rolled back", if_active=("digits", 3))
    assert skipped.ok and skipped.code == "not_active"
    assert "the active model is digits v2, not digits v3" in log.of(ev.ROLLBACK_SKIPPED)[-1].reason
    assert installer.store.active().manifest.version == 2 and installer.store.previous() is not None
    done = installer.rollback("rollout r1 rolled back", if_active=("digits", 2))
    assert done.ok and done.code == "rolled_back"
    done.loaded.close()
    assert installer.store.active().manifest.version == 1


def test_rollback_refuses_a_previous_model_whose_stored_copy_was_altered(device, profile, digits_tflite_int8,
                                                                         release_key):
    installer, log, tmp_path = device
    installer.install_file(make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2)).loaded.close()
    previous = installer.store.previous()
    data = bytearray(previous.model_path.read_bytes())
    data[100] ^= 0x01
    previous.model_path.write_bytes(bytes(data))
    result = installer.rollback("breach")
    assert not result.ok and result.code == "tampered"
    assert installer.store.active().manifest.version == 2
    assert "active model stays" in log.events[-1].reason


# --- refusals --------------------------------------------------------------------------------

def test_unsigned_bundle(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    raw = bundle_mod.read_bundle(make_bundle(tmp_path / "v2.lfb", digits_tflite_float, release_key, version=2))
    no_sig = rebuild(tmp_path / "nosig.lfb", raw.manifest_bytes, None, raw.model)
    assert "missing manifest.sig" in refused(installer, log, no_sig, "bad_bundle")
    empty_sig = rebuild(tmp_path / "emptysig.lfb", raw.manifest_bytes, b"{}", raw.model)
    assert "expected 'ed25519'" in refused(installer, log, empty_sig, "bad_signature")
    assert_v1_still_serves(installer, profile)


def test_tampered_manifest_and_tampered_model(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    raw = bundle_mod.read_bundle(make_bundle(tmp_path / "v2.lfb", digits_tflite_float, release_key, version=2))
    doc = json.loads(raw.manifest_bytes)
    doc["version"] = 9
    altered = rebuild(tmp_path / "m.lfb", json.dumps(doc).encode(), raw.signature_bytes, raw.model)
    assert "altered after signing" in refused(installer, log, altered, "bad_signature")
    model = bytearray(raw.model)
    model[len(model) // 2] ^= 0xFF
    bad_model = rebuild(tmp_path / "b.lfb", raw.manifest_bytes, raw.signature_bytes, bytes(model))
    message = refused(installer, log, bad_model, "tampered")
    assert "does not match its signed sha256" in message and "fetch it again" in message
    assert log.events[-1].kind == ev.DEPLOY_REJECTED
    assert_v1_still_serves(installer, profile)


def test_unknown_key_and_wrong_role(device, profile, digits_tflite_float, keys_dir, tmp_path_factory):
    installer, log, tmp_path = device
    other = tmp_path_factory.mktemp("other-keys")
    keys.generate("release", other)
    stranger = make_bundle(tmp_path / "s.lfb", digits_tflite_float, keys.load_private(other / "release.key"),
                           version=2)
    assert "not a trusted key" in refused(installer, log, stranger, "bad_signature")
    by_operator = make_bundle(tmp_path / "o.lfb", digits_tflite_float, keys.load_private(keys_dir / "operator.key"),
                              version=2)
    assert "needs a release key" in refused(installer, log, by_operator, "bad_signature")
    assert_v1_still_serves(installer, profile)


def test_wrong_profile(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    path = make_bundle(tmp_path / "p.lfb", digits_tflite_float, release_key, version=2, profile="rpi4-cpu")
    message = refused(installer, log, path, "wrong_profile")
    assert "built for profile 'rpi4-cpu', this device runs 'x86-cpu'" in message
    assert "convert the model for x86-cpu" in message
    assert_v1_still_serves(installer, profile)


def test_agent_too_old(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    path = make_bundle(tmp_path / "a.lfb", digits_tflite_float, release_key, version=2, min_agent_version="99.0")
    assert "needs agent 99.0 or newer" in refused(installer, log, path, "agent_too_old")
    assert_v1_still_serves(installer, profile)


def test_not_newer(device, profile, digits_tflite_float, digits_tflite_int8, release_key):
    installer, log, tmp_path = device
    same = make_bundle(tmp_path / "same.lfb", digits_tflite_float, release_key, version=1)
    assert "already active" in refused(installer, log, same, "not_newer")
    installer.install_file(make_bundle(tmp_path / "v3.lfb", digits_tflite_int8, release_key, version=3)).loaded.close()
    log.events.clear()
    older = make_bundle(tmp_path / "v2.lfb", digits_tflite_float, release_key, version=2)
    message = refused(installer, log, older, "not_newer")
    assert "v2 is not newer than the active digits v3" in message and "rollback" in message
    assert installer.store.active().manifest.version == 3


def test_no_space_and_no_memory_refused_before_staging(device, trusted, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    path = make_bundle(tmp_path / "v2.lfb", digits_tflite_float, release_key, version=2)
    tight = Installer(installer.store, trusted, profile, events=log, disk_margin_bytes=1 << 60)
    message = refused(tight, log, path, "no_space")
    assert "free, installing this" in message and "free disk space" in message
    huge = make_bundle(tmp_path / "big.lfb", digits_tflite_float, release_key, version=2,
                       estimates={"arena_bytes": 1 << 20, "peak_memory_bytes": 1 << 50})
    message = refused(installer, log, huge, "no_memory")
    assert "estimates.peak_memory_bytes" in message
    # precheck() alone, as the MQTT transport calls it before downloading anything.
    manifest = bundle_mod.verify(bundle_mod.read_bundle(huge), trusted).manifest
    with pytest.raises(InstallError) as info:
        installer.precheck(manifest)
    assert info.value.code == "no_memory"
    assert_v1_still_serves(installer, profile)


def test_smoke_test_failure_never_activates(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    doc = manifest_for(digits_tflite_float, version=2, expected=np.full((1, 10), 0.5, np.float32))
    path = bundle_mod.write_bundle(tmp_path / "bad.lfb", bundle_mod.build(doc, digits_tflite_float, release_key))
    message = refused(installer, log, path, "smoke_test_failed")
    assert "failed its smoke test" in message and "more than atol" in message
    assert "digits v1 stays active" in message
    assert log.events[-1].kind == ev.INSTALL_FAILED
    assert installer.store.journal()["outcome"].startswith("failed")
    assert_v1_still_serves(installer, profile)


def test_a_model_that_cannot_load(device, profile, digits_tflite_float, release_key):
    installer, log, tmp_path = device
    garbage = b"this is not a flatbuffer" * 100
    doc = manifest_for(digits_tflite_float, version=2)
    doc["model"] = model_section(garbage)
    path = bundle_mod.write_bundle(tmp_path / "g.lfb", bundle_mod.build(doc, garbage, release_key))
    assert "cannot be loaded on this device" in refused(installer, log, path, "load_failed")
    assert_v1_still_serves(installer, profile)


def test_failed_hand_over_restores_the_previous_model(device, trusted, profile, digits_tflite_int8, release_key):
    installer, log, tmp_path = device

    def broken_swap(loaded):
        raise RuntimeError("model slot is shutting down")

    failing = Installer(installer.store, trusted, profile, events=log, on_activate=broken_swap)
    path = make_bundle(tmp_path / "v2.lfb", digits_tflite_int8, release_key, version=2)
    message = refused(failing, log, path, "activate_failed")
    assert "model slot is shutting down" in message and "previous model was restored" in message
    assert_v1_still_serves(installer, profile)


def test_not_a_bundle(device, profile):
    installer, log, tmp_path = device
    junk = tmp_path / "junk.lfb"
    junk.write_bytes(b"\x00" * 10)
    assert "junk.lfb" in refused(installer, log, junk, "bad_bundle")
    assert "not found" in refused(installer, log, tmp_path / "missing.lfb", "bad_bundle")
    assert_v1_still_serves(installer, profile)


# --- the command ----------------------------------------------------------------------------

def test_install_bundle_command_without_a_config(tmp_path, keys_dir, digits_tflite_float, release_key):
    from tests.conftest import run_cli
    state = tmp_path / "state"
    v1 = make_bundle(tmp_path / "v1.lfb", digits_tflite_float, release_key, version=1)
    flags = ["--state-dir", str(state), "--trust-dir", str(keys_dir), "--profile", "x86-cpu"]
    ok = run_cli("agent", "install-bundle", str(v1), *flags)
    assert ok.returncode == 0, ok.stderr
    assert "installed digits v1" in ok.stdout and "on xnnpack" in ok.stdout
    again = run_cli("agent", "install-bundle", str(v1), *flags, "--json")
    assert again.returncode == 1
    assert "install refused (not_newer): digits v1 is not newer than the active digits v1" in again.stderr
    doc = json.loads(again.stdout)
    assert doc["ok"] is False and doc["code"] == "not_newer" and doc["store"]["active"]["version"] == 1
    assert doc["events"][0]["kind"] == ev.DEPLOY_REJECTED
    wrong = run_cli("agent", "install-bundle", str(v1), "--state-dir", str(state), "--trust-dir",
                    str(tmp_path / "no-keys"), "--profile", "x86-cpu")
    assert wrong.returncode == 78 and "trusted key directory not found" in wrong.stderr
