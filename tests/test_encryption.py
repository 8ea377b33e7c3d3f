"""Encrypted bundles: the format, the device side with real interpreters, and the real CLIs.

- the format (agent/protocol/encryption.py): round trip for every recipient, a key that is not a
  recipient, a tampered chunk (caught by its signed hash before decryption, and by the AEAD if
  the hash were bypassed), reordered and truncated chunks, re-wrapping that keeps the ciphertext;
- the device: the installer decrypts in memory at install and at rollback, the store holds only
  ciphertext, a device that is not a recipient refuses and keeps its model;
- the CLIs as real processes: `litefleet keys generate --role x25519`, `litefleet bundle
  encrypt|inspect|verify|rewrap`, `litefleet-agent install` (the device key) and `install-bundle`;
- the fleet server's key list (`/api/v1/keys`) from real birth messages in a real SQLite store.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from agent import events as ev
from agent.events import EventLog
from agent.installer import Installer
from agent.protocol import bundle as bundle_mod
from agent.protocol import encryption, keys, profiles
from agent.protocol.errors import BundleError, TamperedError, TruncatedBundleError
from agent.protocol.manifest import Manifest, chunk_hashes
from agent.store import ModelStore
from tests.conftest import run_cli
from tests.support.bundles import make_bundle, manifest_for

CHUNK = 2048   # the int8 digits model (~45 KB) is then 23 encrypted chunks
WINDOW = 64


def plaintext_windows(data: bytes, plaintext: bytes, width: int = WINDOW) -> int:
    """How many places in ``data`` hold a ``width``-byte window of ``plaintext`` (any offset).

    Every such window contains one of the plaintext's ``width/2``-byte blocks at an aligned offset,
    so those blocks are looked up at every offset of ``data`` and each hit is checked in full.
    Padding-like blocks (fewer than 4 distinct byte values) are skipped: runs of zeros are in
    every file.
    """
    half = width // 2
    blocks: dict[bytes, list[int]] = {}
    for j in range(0, len(plaintext) - half + 1, half):
        block = plaintext[j:j + half]
        if len(set(block)) >= 4:
            blocks.setdefault(block, []).append(j)
    hits = 0
    for k in range(len(data) - half + 1):
        for j in blocks.get(data[k:k + half], ()):
            if any(0 <= k - (j - i) and data[k - (j - i):k - (j - i) + width] == plaintext[i:i + width]
                   for i in range(max(0, j - half + 1), min(j, len(plaintext) - width) + 1)):
                hits += 1
                break
    return hits


def files_with_plaintext(directory: Path, *plaintexts: bytes) -> list[str]:
    """Every file under ``directory`` that holds a window of any of ``plaintexts``."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(plaintext_windows(data, p) for p in plaintexts):
            found.append(str(path.relative_to(directory)))
    return found


@pytest.fixture(scope="module")
def xkeys(tmp_path_factory):
    """X25519 key pairs: the publisher's owner key and three devices' keys."""
    directory = tmp_path_factory.mktemp("x25519")
    for name in ("owner", "dev-a", "dev-b", "dev-c"):
        keys.generate_x25519(directory, name)
    return {name: keys.load_x25519_private(directory / f"{name}.x25519.key")
            for name in ("owner", "dev-a", "dev-b", "dev-c")} | {"dir": directory}


def recipient(xkeys, name: str) -> keys.Recipient:
    return keys.Recipient(name, xkeys[name].public_key())


@pytest.fixture(scope="module")
def plain_doc(digits_tflite_int8):
    return manifest_for(digits_tflite_int8, version=2, mode="int8", chunk_size=CHUNK)


@pytest.fixture(scope="module")
def sealed(plain_doc, digits_tflite_int8, xkeys):
    """The int8 digits model encrypted for the owner and dev-a: (manifest, ciphertext)."""
    doc, ciphertext = encryption.encrypt(plain_doc, digits_tflite_int8,
                                         [recipient(xkeys, "owner"), recipient(xkeys, "dev-a")])
    return Manifest.from_dict(doc), ciphertext


# --- the format --------------------------------------------------------------------------------------------


def test_every_recipient_gets_the_exact_model_and_the_bundle_holds_only_ciphertext(
        sealed, plain_doc, digits_tflite_int8, release_key, trusted_keys, xkeys):
    manifest, ciphertext = sealed
    data = bundle_mod.build(manifest.doc, ciphertext, release_key)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["manifest.json", "manifest.sig", "model.tflite.enc"]
    verified = bundle_mod.verify(bundle_mod.parse_bundle(data), trusted_keys)
    for name in ("owner", "dev-a"):
        assert encryption.decrypt(verified.manifest, verified.model, xkeys[name]) == digits_tflite_int8

    # the signed manifest describes the ciphertext chunk by chunk, and the plaintext as a whole
    enc = verified.manifest.encryption
    assert verified.manifest.chunk_size == CHUNK and enc["plaintext"]["chunk_size"] == CHUNK - 16
    assert verified.manifest.chunks == chunk_hashes(ciphertext, CHUNK)
    assert len(verified.manifest.chunks) == -(-len(digits_tflite_int8) // (CHUNK - 16))
    assert enc["plaintext"]["sha256"] == hashlib.sha256(digits_tflite_int8).hexdigest()
    assert [r["label"] for r in enc["recipients"]] == ["owner", "dev-a"]

    # no 64-byte window of the model is in the bundle; the scan finds it in the plain bundle
    plain_bundle = bundle_mod.build(plain_doc, digits_tflite_int8, release_key)
    assert plaintext_windows(plain_bundle, digits_tflite_int8) > 100
    assert plaintext_windows(data, digits_tflite_int8) == 0
    # a fresh content key and nonce prefix every time: the same model never encrypts the same way
    again, ciphertext2 = encryption.encrypt(plain_doc, digits_tflite_int8, [recipient(xkeys, "dev-a")])
    assert ciphertext2[:64] != ciphertext[:64] and again["encryption"]["content_id"] != enc["content_id"]


def test_a_key_that_is_not_a_recipient_cannot_open_the_model(sealed, xkeys):
    manifest, ciphertext = sealed
    outsider = xkeys["dev-b"]
    with pytest.raises(encryption.NotRecipientError, match=keys.x25519_key_id(outsider.public_key())) as exc:
        encryption.decrypt(manifest, ciphertext, outsider)
    assert "encrypted for 2 recipient(s) (owner, dev-a)" in str(exc.value)

    # claiming dev-a's wrapped key under dev-b's key id does not help: the key wrap's AEAD refuses
    doc = copy.deepcopy(manifest.doc)
    doc["encryption"]["recipients"][1]["key_id"] = keys.x25519_key_id(outsider.public_key())
    with pytest.raises(encryption.DecryptionError, match="does not open"):
        encryption.unwrap(Manifest.from_dict(doc), outsider)


def test_a_tampered_chunk_is_caught_by_its_signed_hash_before_any_decryption(
        sealed, release_key, trusted_keys, xkeys):
    manifest, ciphertext = sealed
    tampered = bytearray(ciphertext)
    tampered[5 * CHUNK + 100] ^= 0x01
    tampered = bytes(tampered)
    with pytest.raises(TamperedError, match=r"model chunk 5 \(bytes 10240-12288\)"):
        encryption.decrypt(manifest, tampered, xkeys["dev-a"])
    parts = bundle_mod.parse_bundle(bundle_mod.build(manifest.doc, ciphertext, release_key))
    with pytest.raises(TamperedError, match="chunk 5"):
        bundle_mod.verify(bundle_mod.Bundle(parts.manifest_bytes, parts.signature_bytes, tampered,
                                            parts.model_name), trusted_keys)
    # were the hash check skipped, the chunk's AEAD tag would still refuse it
    with pytest.raises(encryption.DecryptionError, match="encrypted chunk 5 of 23 does not open"):
        encryption.decrypt_with(manifest, tampered, encryption.unwrap(manifest, xkeys["dev-a"]))


def test_reordered_chunks_do_not_open_even_under_matching_hashes(sealed, xkeys):
    manifest, ciphertext = sealed
    chunks = [ciphertext[i:i + CHUNK] for i in range(0, len(ciphertext), CHUNK)]
    chunks[1], chunks[2] = chunks[2], chunks[1]
    swapped = b"".join(chunks)
    doc = copy.deepcopy(manifest.doc)   # a manifest whose hashes follow the swap (only a signer could make it)
    doc["model"]["chunks"] = chunk_hashes(swapped, CHUNK)
    doc["model"]["sha256"] = hashlib.sha256(swapped).hexdigest()
    forged = Manifest.from_dict(doc)
    with pytest.raises(encryption.DecryptionError, match="encrypted chunk 1 of 23"):
        encryption.decrypt(forged, swapped, xkeys["dev-a"])
    with pytest.raises(TamperedError, match="chunk 1"):   # under the real manifest: the hashes
        encryption.decrypt(manifest, swapped, xkeys["dev-a"])


def test_truncation_is_refused_by_the_tar_the_hashes_and_the_chunk_count_in_the_associated_data(
        sealed, release_key, xkeys):
    manifest, ciphertext = sealed
    data = bundle_mod.build(manifest.doc, ciphertext, release_key)
    with pytest.raises(TruncatedBundleError, match="truncated"):
        bundle_mod.parse_bundle(data[: len(data) // 2])
    with pytest.raises(TamperedError, match=f"model is {len(ciphertext) - CHUNK} bytes"):
        encryption.decrypt(manifest, ciphertext[:-CHUNK], xkeys["dev-a"])
    # a consistent manifest for the first 22 chunks (the last dropped): every chunk is bound to the count
    last = len(ciphertext) - 22 * CHUNK
    shorter = ciphertext[:22 * CHUNK]
    doc = copy.deepcopy(manifest.doc)
    doc["model"].update(size=len(shorter), sha256=hashlib.sha256(shorter).hexdigest(),
                        chunks=chunk_hashes(shorter, CHUNK))
    doc["encryption"]["plaintext"]["size"] -= last - 16
    with pytest.raises(encryption.DecryptionError, match="encrypted chunk 0 of 22"):
        encryption.decrypt(Manifest.from_dict(doc), shorter, xkeys["dev-a"])


def test_the_manifest_schema_keeps_an_encrypted_model_consistent(sealed):
    manifest, _ = sealed
    cases = [
        (lambda d: d["model"].update(filename="model.tflite"), "but the manifest has encryption section"),
        (lambda d: d["encryption"]["plaintext"].update(chunk_size=CHUNK), "one AEAD tag per chunk"),
        (lambda d: d["encryption"]["plaintext"].update(size=d["encryption"]["plaintext"]["size"] + 1),
         "plus 16 per chunk"),
        (lambda d: d["encryption"].update(recipients=[]), "encryption.recipients: must not be empty"),
        (lambda d: d["encryption"]["recipients"][0].update(wrapped_key="AAAA"), "must be base64 of 48 bytes"),
        (lambda d: d["encryption"].update(aead="aes-128-cbc"), "encryption.aead"),
    ]
    for change, words in cases:
        doc = copy.deepcopy(manifest.doc)
        change(doc)
        with pytest.raises(BundleError, match=words):
            Manifest.from_dict(doc)


def test_rewrap_changes_only_the_recipients_and_keeps_the_owner(sealed, xkeys):
    manifest, ciphertext = sealed
    doc = encryption.rewrap(manifest.doc, ciphertext, xkeys["owner"], [recipient(xkeys, "dev-b")])
    rewrapped = Manifest.from_dict(doc)
    assert rewrapped.model == manifest.model
    assert {k: v for k, v in doc["encryption"].items() if k != "recipients"} == \
        {k: v for k, v in manifest.encryption.items() if k != "recipients"}
    assert [r["label"] for r in doc["encryption"]["recipients"]] == ["dev-b", "owner"]
    assert encryption.decrypt(rewrapped, ciphertext, xkeys["dev-b"]) == \
        encryption.decrypt(manifest, ciphertext, xkeys["dev-a"])
    with pytest.raises(encryption.NotRecipientError):
        encryption.decrypt(rewrapped, ciphertext, xkeys["dev-a"])
    with pytest.raises(encryption.NotRecipientError):   # only a recipient's key can re-wrap
        encryption.rewrap(manifest.doc, ciphertext, xkeys["dev-c"], [recipient(xkeys, "dev-c")])


# --- the device -----------------------------------------------------------------------------------------------


def test_the_device_decrypts_in_memory_at_install_and_rollback_and_stores_only_ciphertext(
        tmp_path, digits_tflite_float, digits_tflite_int8, release_key, trusted_keys, xkeys):
    profile = profiles.load_profile("x86-cpu")
    for_a = [recipient(xkeys, "owner"), recipient(xkeys, "dev-a")]
    bundles = {}
    for version, model, mode in ((1, digits_tflite_float, "float32"), (2, digits_tflite_int8, "int8")):
        doc, ciphertext = encryption.encrypt(manifest_for(model, version=version, mode=mode, chunk_size=CHUNK),
                                             model, for_a)
        bundles[version] = bundle_mod.write_bundle(tmp_path / f"v{version}.lfb",
                                                   bundle_mod.build(doc, ciphertext, release_key))
    log = EventLog()
    store = ModelStore(tmp_path / "state")
    installer = Installer(store, trusted_keys, profile, events=log, decryption_key=xkeys["dev-a"])
    for version in (1, 2):
        result = installer.install_file(bundles[version])
        assert result.ok and result.manifest.version == version, result.message   # loaded and smoke-tested
        result.loaded.close()
    active = store.active()
    assert active.model_path.name == "model.tflite.enc" and store.previous().model_path.name == "model.tflite.enc"
    rolled = installer.rollback("test")   # the previous model is read from the store and decrypted again
    assert rolled.ok and rolled.manifest.version == 1, rolled.message
    rolled.loaded.close()
    assert files_with_plaintext(store.state_dir, digits_tflite_float, digits_tflite_int8) == []

    # a device that is not a recipient refuses before writing anything, and keeps serving its model
    other = ModelStore(tmp_path / "other")
    plain_v1 = make_bundle(tmp_path / "plain-v1.lfb", digits_tflite_float, release_key, version=1)
    for key, words in ((xkeys["dev-b"], "this device is not a recipient"), (None, "has no X25519 key")):
        log = EventLog()
        device = Installer(other, trusted_keys, profile, events=log, decryption_key=key)
        if other.active() is None:
            first = device.install_file(plain_v1)
            assert first.ok, first.message
            first.loaded.close()
            log.events.clear()
        refused = device.install_file(bundles[2])
        assert not refused.ok and refused.code == "not_recipient" and words in refused.message, refused.message
        assert log.kinds() == [ev.DEPLOY_REJECTED] and log.events[0].details["code"] == "not_recipient"
        assert other.active().manifest.version == 1 and other.slots() == [other.active().slot]


def test_install_bundle_cli_opens_an_encrypted_bundle_with_the_device_key(
        tmp_path, digits_tflite_int8, release_key, keys_dir, xkeys, sealed):
    manifest, ciphertext = sealed
    bundle = bundle_mod.write_bundle(tmp_path / "enc.lfb", bundle_mod.build(manifest.doc, ciphertext, release_key))
    args = ["agent", "install-bundle", str(bundle), "--state-dir", str(tmp_path / "state"),
            "--trust-dir", str(keys_dir), "--profile", "x86-cpu", "--json"]
    refused = run_cli(*args, "--x25519-key", str(xkeys["dir"] / "dev-b.x25519.key"))
    assert refused.returncode == 1 and "install refused (not_recipient)" in refused.stderr, refused.stderr
    assert "not a recipient" in refused.stderr and "litefleet bundle rewrap" in refused.stderr
    done = run_cli(*args, "--x25519-key", str(xkeys["dir"] / "dev-a.x25519.key"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 2
    assert files_with_plaintext(tmp_path / "state", digits_tflite_int8) == []


# --- the CLIs ----------------------------------------------------------------------------------------------------


def test_cli_encrypts_inspects_and_rewraps_keeping_the_ciphertext_byte_identical(
        tmp_path, digits_tflite_int8, release_key, keys_dir):
    owner_dir, devices = tmp_path / "owner", tmp_path / "devices"
    made = run_cli("keys", "generate", "--role", "x25519", "-o", str(owner_dir), "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert Path(info["private_key"]).name == "owner.x25519.key" and len(info["key_id"]) == 16
    assert stat.S_IMODE(Path(info["private_key"]).stat().st_mode) == 0o600
    for name in ("cam-1", "cam-2"):
        assert run_cli("keys", "generate", "--role", "x25519", "--name", name, "-o", str(devices)).returncode == 0
    plain = make_bundle(tmp_path / "digits-v2.lfb", digits_tflite_int8, release_key, version=2, mode="int8",
                        chunk_size=CHUNK)
    sign = ["--sign-key", str(keys_dir / "release.key")]

    enc = run_cli("bundle", "encrypt", str(plain), "--encrypt-for", str(devices / "cam-1.x25519.pub"),
                  str(owner_dir), *sign, "-o", str(tmp_path / "enc.lfb"), "--json")
    assert enc.returncode == 0, enc.stderr
    assert [r["label"] for r in json.loads(enc.stdout)["recipients"]] == ["cam-1", "owner"]
    shown = run_cli("bundle", "inspect", str(tmp_path / "enc.lfb"))
    assert "ENCRYPTED (chacha20-poly1305)" in shown.stdout and "cam-1" in shown.stdout, shown.stdout
    checked = run_cli("bundle", "verify", str(tmp_path / "enc.lfb"), "--trust", str(keys_dir / "release.pub"))
    assert checked.returncode == 0 and "(encrypted for 2 recipient(s))" in checked.stdout, checked.stderr

    # the fleet's key list (what `litefleet fleet keys --json` prints) as the new recipient list
    cam2 = keys.load_x25519_public(devices / "cam-2.x25519.pub")
    fleet_keys = tmp_path / "fleet-keys.json"
    fleet_keys.write_text(json.dumps({"keys": [{"device_id": "cam-2", "x25519": keys.x25519_b64(cam2)}],
                                      "without_key": []}))
    rew = run_cli("bundle", "rewrap", str(tmp_path / "enc.lfb"), "--owner-key", str(owner_dir / "owner.x25519.key"),
                  "--encrypt-for", str(fleet_keys), *sign, "-o", str(tmp_path / "rewrapped.lfb"))
    assert rew.returncode == 0, rew.stderr
    assert "re-wrapped for 2 recipient(s): cam-2" in rew.stdout and "owner" in rew.stdout
    before, after = bundle_mod.read_bundle(tmp_path / "enc.lfb"), bundle_mod.read_bundle(tmp_path / "rewrapped.lfb")
    assert after.model == before.model, "re-wrapping must not re-encrypt the model"
    m_before, m_after = Manifest.parse(before.manifest_bytes), Manifest.parse(after.manifest_bytes)
    assert m_after.model == m_before.model
    assert bundle_mod.blob_id(after.manifest_bytes) != bundle_mod.blob_id(before.manifest_bytes)
    trusted = [keys.load_public(keys_dir / "release.pub")]
    verified = bundle_mod.verify(after, trusted)
    cam2_key = keys.load_x25519_private(devices / "cam-2.x25519.key")
    assert encryption.decrypt(verified.manifest, verified.model, cam2_key) == digits_tflite_int8

    # cam-1 is no recipient any more: its key can neither open nor re-wrap the new bundle
    again = run_cli("bundle", "rewrap", str(tmp_path / "rewrapped.lfb"), "--owner-key",
                    str(devices / "cam-1.x25519.key"), "--encrypt-for", str(devices), *sign, "-o", str(tmp_path / "x.lfb"))
    assert again.returncode != 0 and "cannot re-wrap it" in again.stderr and "not one of them" in again.stderr
    twice = run_cli("bundle", "encrypt", str(tmp_path / "enc.lfb"), "--encrypt-for", str(devices), *sign,
                    "-o", str(tmp_path / "x.lfb"))
    assert twice.returncode != 0 and "already encrypted" in twice.stderr
    other = tmp_path / "other"
    keys.generate("release", other)
    foreign = run_cli("bundle", "encrypt", str(plain), "--encrypt-for", str(devices), "--sign-key",
                      str(other / "release.key"), "-o", str(tmp_path / "x.lfb"))
    assert foreign.returncode != 0 and "--trust" in foreign.stderr, foreign.stderr
    assert not (tmp_path / "x.lfb").exists()
    bad = run_cli("bundle", "encrypt", str(plain), "--encrypt-for", str(keys_dir / "release.pub"), *sign,
                  "-o", str(tmp_path / "x.lfb"))
    assert bad.returncode != 0 and "not an X25519 public key" in bad.stderr


def test_convert_encrypts_for_the_given_keys_and_a_bad_key_fails_before_converting(
        tmp_path, digits_tflite_int8, digits, keys_dir, xkeys):
    import numpy as np
    source = tmp_path / "digits.tflite"
    source.write_bytes(digits_tflite_int8)
    np.savez(tmp_path / "eval.npz", x=digits[2][:200], y=digits[3][:200])
    args = ["convert", str(source), "--profile", "rpi4-cpu", "--eval", str(tmp_path / "eval.npz"), "--name", "digits",
            "--version", "1", "--sign-key", str(keys_dir / "release.key"), "--json"]
    missing = run_cli(*args, "-o", str(tmp_path / "bad"), "--encrypt-for", str(tmp_path / "nobody.x25519.pub"))
    assert missing.returncode == 2 and "nobody.x25519.pub: public key file not found" in missing.stderr
    assert "converting" not in missing.stderr and not (tmp_path / "bad").exists()

    done = run_cli(*args, "-o", str(tmp_path / "out"), "--encrypt-for", str(xkeys["dir"] / "dev-a.x25519.pub"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encrypting the model for 1 recipient(s): dev-a" in done.stderr
    assert "no owner key" in done.stderr   # a reminder: re-wrapping later needs a recipient's private key
    bundle = tmp_path / "out" / "digits-v1-rpi4-cpu.lfb"
    verified = bundle_mod.verify(bundle_mod.read_bundle(bundle), [keys.load_public(keys_dir / "release.pub")])
    assert encryption.recipients_of(verified.manifest) == [
        {"key_id": keys.x25519_key_id(xkeys["dev-a"].public_key()), "label": "dev-a"}]
    plain = encryption.decrypt(verified.manifest, verified.model, xkeys["dev-a"])
    assert plaintext_windows(bundle.read_bytes(), plain) == 0 and len(plain) == verified.manifest.encryption[
        "plaintext"]["size"]


def test_agent_install_makes_a_root_only_device_key_and_hands_it_over_as_a_credential(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\n")
    proc = run_cli("agent", "install", "--root", str(root), "--device-id", "pi-9")
    assert proc.returncode == 0, proc.stderr
    private = root / "etc/litefleet/keys/device.x25519.key"
    public = root / "etc/litefleet/keys/device.x25519.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert "PRIVATE KEY" not in proc.stdout
    key = keys.load_x25519_private(private)
    assert keys.x25519_public_pem(key.public_key()) == public.read_bytes()
    unit = (root / "etc/systemd/system/litefleet-agent.service").read_text()
    assert "LoadCredential=device.x25519.key:/etc/litefleet/keys/device.x25519.key" in unit.splitlines()
    assert 'x25519_key_file = "/etc/litefleet/keys/device.x25519.key"' in (root / "etc/litefleet/agent.toml").read_text()
    assert keys.x25519_key_id(key.public_key()) in proc.stdout

    again = run_cli("agent", "install", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert keys.load_x25519_private(private).private_bytes_raw() == key.private_bytes_raw(), "the key was replaced"
    assert "the device's X25519 key exists; not replaced" in again.stdout


def test_the_fleet_server_lists_the_keys_devices_reported(tmp_path, xkeys):
    from fleet.api import Request, ServerApi
    from fleet.store import IngestBatch, open_store
    store = open_store(str(tmp_path / "fleet.db"))
    store.migrate()
    key_a = keys.x25519_b64(xkeys["dev-a"].public_key())

    def birth(device_id: str, public_keys: dict, groups: list[str]) -> tuple[str, dict]:
        return device_id, {"v": 1, "state": "online", "device_id": device_id, "ts": 1000.0, "fleet": "f",
                           "groups": groups, "profile": "x86-cpu", "public_keys": public_keys}
    store.write_batch(IngestBatch(statuses=[birth("dev-a", {"x25519": key_a}, ["line-1"]),
                                            birth("dev-old", {}, ["line-1"]),
                                            birth("dev-bad", {"x25519": "bm90IGEga2V5"}, ["line-2"])],
                                  telemetry=[], events=[]))
    # going offline keeps the key the device reported
    store.write_batch(IngestBatch(statuses=[("dev-a", {"v": 1, "state": "offline", "device_id": "dev-a",
                                                       "ts": 1001.0, "reason": "connection lost"})],
                                  telemetry=[], events=[]))
    api = ServerApi(store, "tok")
    response = api.handle(Request.from_target("GET", "/api/v1/keys", {"Authorization": "Bearer tok"}))
    doc = json.loads(response.body)
    assert response.status == 200
    assert [(k["device_id"], k["x25519"], k["key_id"], k["online"]) for k in doc["keys"]] == \
        [("dev-a", key_a, keys.x25519_key_id(xkeys["dev-a"].public_key()), False)]
    assert doc["without_key"] == ["dev-bad", "dev-old"]
    filtered = api.handle(Request.from_target("GET", "/api/v1/keys?group=line-2", {"Authorization": "Bearer tok"}))
    assert json.loads(filtered.body) == {"keys": [], "without_key": ["dev-bad"]}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    assert [(r.label, r.key_id) for r in keys.load_recipients([path])] == \
        [("dev-a", keys.x25519_key_id(xkeys["dev-a"].public_key()))]
    store.close()
