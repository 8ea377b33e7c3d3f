"""The model store on real files: slots, the atomic pointer, garbage collection, recovery, locking."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.engine import load_model, smoke_test
from agent.errors import InstallError
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, profiles
from agent.protocol.errors import SignatureError, TamperedError
from agent.store import CRASH_ENV, STEPS, ModelStore, crash_point
from tests.support.bundles import make_bundle


@pytest.fixture(scope="module")
def profile():
    return profiles.load_profile("x86-cpu")


@pytest.fixture(scope="module")
def trusted(keys_dir):
    return keys.load_trusted_dir(keys_dir)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, digits_tflite_float, digits_tflite_int8, release_key):
    """Three versions as (manifest, manifest_bytes, signature_bytes, model); v3 reuses v1's model bytes."""
    out = {}
    directory = tmp_path_factory.mktemp("bundles")
    for version, model in ((1, digits_tflite_float), (2, digits_tflite_int8), (3, digits_tflite_float)):
        raw = bundle_mod.read_bundle(make_bundle(directory / f"v{version}.lfb", model, release_key, version=version))
        verified = bundle_mod.verify(raw, [keys.PublicKey("release", release_key.public_key())])
        out[version] = (verified.manifest, raw.manifest_bytes, raw.signature_bytes, raw.model)
    return out


def install(store: ModelStore, part) -> str:
    manifest, manifest_bytes, signature_bytes, model = part
    with store.begin_install(manifest, manifest_bytes, signature_bytes) as txn:
        txn.stage(model)
        txn.record("loaded")
        txn.record("smoke_ok")
        txn.activate()
    return txn.target


def assert_serves(store: ModelStore, profile, version: int) -> None:
    active = store.active()
    assert active is not None and active.manifest.version == version
    loaded = load_model(active.read_model(), active.manifest, profile)
    try:
        assert smoke_test(loaded) >= 0
    finally:
        loaded.close()


def test_empty_store(tmp_path):
    store = ModelStore(tmp_path / "state")
    assert store.active() is None and store.previous() is None and store.slots() == []
    assert store.recovered == []


def test_install_keeps_the_signed_files_and_switches_atomically(tmp_path, parts, profile, trusted):
    store = ModelStore(tmp_path)
    manifest, manifest_bytes, signature_bytes, model = parts[1]
    with store.begin_install(manifest, manifest_bytes, signature_bytes) as txn:
        staged = txn.stage(model)
        assert staged.slot == manifest.sha256
        assert sorted(p.name for p in staged.directory.iterdir()) == ["manifest.json", "manifest.sig", "model.tflite"]
        assert store.active() is None, "staging must not activate anything"
        txn.record("loaded")
        txn.record("smoke_ok")
        txn.activate()
        assert store.active().slot == manifest.sha256
    journal = store.journal()
    assert [s["step"] for s in journal["steps"]] == list(STEPS)
    assert journal["outcome"] == "installed"
    pointer = json.loads((tmp_path / "current.json").read_text())
    assert pointer["active"] == manifest.sha256 and pointer["previous"] is None
    # The stored copy re-verifies against the trusted keys.
    assert store.active().read_verified(trusted).manifest.version == 1
    assert_serves(store, profile, 1)


def test_previous_is_kept_and_older_slots_are_collected(tmp_path, parts, profile):
    store = ModelStore(tmp_path)
    s1 = install(store, parts[1])
    s2 = install(store, parts[2])
    assert (store.active().slot, store.previous().slot) == (s2, s1)
    assert sorted(store.slots()) == sorted([s1, s2])
    s3 = install(store, parts[3])   # v1's model bytes while v1 is still previous: a sibling slot
    assert (store.active().manifest.version, store.previous().manifest.version) == (3, 2)
    assert sorted(store.slots()) == sorted([s2, s3])
    assert_serves(store, profile, 3)


def test_same_model_bytes_under_a_new_manifest_get_their_own_slot(tmp_path, parts):
    store = ModelStore(tmp_path)
    s1 = install(store, parts[1])
    s3 = install(store, parts[3])
    assert s3 != s1 and s3.startswith(parts[3][0].sha256)
    assert store.previous().manifest.version == 1 and store.active().manifest.version == 3


def test_abort_after_switch_restores_the_old_pointer_and_removes_the_new_slot(tmp_path, parts, profile):
    store = ModelStore(tmp_path)
    s1 = install(store, parts[1])
    manifest, manifest_bytes, signature_bytes, model = parts[2]
    with pytest.raises(RuntimeError):
        with store.begin_install(manifest, manifest_bytes, signature_bytes) as txn:
            txn.stage(model)
            txn.activate()
            assert store.active().manifest.version == 2
            raise RuntimeError("the daemon could not swap the model")
    assert store.active().slot == s1 and store.previous() is None
    assert store.slots() == [s1]
    assert store.journal()["outcome"].startswith("failed: RuntimeError")
    assert_serves(store, profile, 1)


def test_recovery_undoes_an_install_that_never_switched(tmp_path, parts, profile):
    store = ModelStore(tmp_path)
    s1 = install(store, parts[1])
    manifest, manifest_bytes, signature_bytes, model = parts[2]
    txn = store.begin_install(manifest, manifest_bytes, signature_bytes)
    txn.stage(model)
    txn.record("loaded")
    txn._close()    # the process "dies" here: lock released, nothing finished
    # Leftovers a kill can leave: a half-written staging slot and an atomic_write temp file.
    (tmp_path / "staging" / "deadbeef").mkdir()
    (tmp_path / "staging" / "deadbeef" / "model.tflite").write_bytes(b"half")
    (tmp_path / ".current.json.tmp-12345").write_bytes(b"{")
    reopened = ModelStore(tmp_path)
    assert reopened.active().slot == s1
    assert reopened.slots() == [s1]
    assert list((tmp_path / "staging").iterdir()) == []
    assert not (tmp_path / ".current.json.tmp-12345").exists()
    assert reopened.journal()["step"] == "done" and "undone by recovery" in reopened.journal()["outcome"]
    assert any("interrupted install" in a and "after step loaded" in a for a in reopened.recovered)
    assert_serves(reopened, profile, 1)


def test_recovery_completes_an_install_that_switched(tmp_path, parts, profile):
    store = ModelStore(tmp_path)
    s1 = install(store, parts[1])
    manifest, manifest_bytes, signature_bytes, model = parts[2]
    txn = store.begin_install(manifest, manifest_bytes, signature_bytes)
    s2 = txn.stage(model).slot
    txn.record("loaded")
    txn.record("smoke_ok")
    store._write_pointer(s2, s1)   # the switch, then the "kill" before the journal recorded it
    txn._close()
    reopened = ModelStore(tmp_path)
    assert (reopened.active().slot, reopened.previous().slot) == (s2, s1)
    assert "completed by recovery" in reopened.journal()["outcome"]
    assert_serves(reopened, profile, 2)


def test_a_damaged_active_slot_falls_back_to_the_previous_model(tmp_path, parts, profile):
    store = ModelStore(tmp_path)
    install(store, parts[1])
    s2 = install(store, parts[2])
    (tmp_path / "models" / s2 / "manifest.json").unlink()
    reopened = ModelStore(tmp_path)
    assert reopened.active().manifest.version == 1 and reopened.previous() is None
    assert any("damaged" in a and "fell back" in a for a in reopened.recovered)
    assert_serves(reopened, profile, 1)


def test_one_writer_at_a_time_and_open_does_not_disturb_a_running_install(tmp_path, parts):
    store = ModelStore(tmp_path, lock_wait_s=0.0)
    manifest, manifest_bytes, signature_bytes, model = parts[1]
    with store.begin_install(manifest, manifest_bytes, signature_bytes) as txn:
        slot = txn.stage(model).slot
        with pytest.raises(InstallError) as info:
            store.begin_install(*parts[2][:3])
        assert info.value.code == "busy" and str(os.getpid()) in str(info.value)
        other = ModelStore(tmp_path)   # e.g. `litefleet-agent status` while the daemon installs
        assert other.recovered == ["recovery skipped: another process is changing the store"]
        assert (tmp_path / "models" / slot).is_dir()
        txn.activate()
    assert store.active().slot == slot


def test_stored_model_is_reverified(tmp_path, parts, keys_dir):
    store = ModelStore(tmp_path)
    install(store, parts[1])
    active = store.active()
    with pytest.raises(SignatureError, match="not a trusted key"):
        active.read_verified([keys.load_public(keys_dir / "operator.pub", role="release")])
    data = bytearray(active.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    active.model_path.write_bytes(bytes(data))
    with pytest.raises(TamperedError, match="chunk 0"):
        active.read_verified(keys.load_trusted_dir(keys_dir))


def test_crash_point_is_inert_unless_named(monkeypatch):
    monkeypatch.delenv(CRASH_ENV, raising=False)
    crash_point("begin")
    monkeypatch.setenv(CRASH_ENV, "staged")
    crash_point("begin")   # another step: the process lives on
