"""The shared protocol module: bundles, signatures, manifests and profiles, without sockets."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, profiles
from agent.protocol.errors import (BundleError, KeyFileError, ProfileError, SignatureError, TamperedError,
                                   TruncatedBundleError)
from agent.protocol.manifest import Manifest, chunk_hashes
from tests.support.bundles import manifest_for


@pytest.fixture(scope="module")
def signed(digits_tflite_float, release_key) -> bytes:
    doc = manifest_for(digits_tflite_float, chunk_size=4096)
    return bundle_mod.build(doc, digits_tflite_float, release_key)


def _retar(data: bytes, replace: dict[str, bytes]) -> bytes:
    """Rebuild a bundle with some members' bytes replaced (what an attacker would do)."""
    src = tarfile.open(fileobj=io.BytesIO(data))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            content = replace.get(member.name, src.extractfile(member).read())
            info = tarfile.TarInfo(member.name)
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    return out.getvalue()


def test_signed_bundle_verifies_and_names_its_signer(signed, trusted_keys, digits_tflite_float):
    verified = bundle_mod.verify(bundle_mod.parse_bundle(signed), trusted_keys)
    assert verified.model == digits_tflite_float
    assert verified.signer.role == "release"
    assert verified.manifest.chunks == chunk_hashes(digits_tflite_float, 4096)
    assert len(verified.manifest.chunks) == -(-len(digits_tflite_float) // 4096)


def test_manifest_is_the_first_member_so_it_can_be_checked_before_the_model(signed):
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(signed))]
    assert names == ["manifest.json", "manifest.sig", "model.tflite"]


def test_tampered_model_names_the_chunk(signed, trusted_keys):
    model = bytearray(bundle_mod.parse_bundle(signed).model)
    model[5000] ^= 0xFF
    with pytest.raises(TamperedError, match=r"chunk 1 \(bytes 4096-8192\)"):
        bundle_mod.verify(bundle_mod.parse_bundle(_retar(signed, {"model.tflite": bytes(model)})), trusted_keys)


def test_tampered_manifest_fails_the_signature(signed, trusted_keys):
    doc = json.loads(bundle_mod.parse_bundle(signed).manifest_bytes)
    doc["version"] = 99
    forged = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SignatureError, match="altered after signing"):
        bundle_mod.verify(bundle_mod.parse_bundle(_retar(signed, {"manifest.json": forged})), trusted_keys)


def test_unknown_key_is_named(signed, tmp_path):
    keys.generate("release", tmp_path)
    other = [keys.load_public(tmp_path / "release.pub")]
    with pytest.raises(SignatureError, match="not a trusted key"):
        bundle_mod.verify(bundle_mod.parse_bundle(signed), other)


def test_operator_key_cannot_sign_bundles(digits_tflite_float, keys_dir, trusted_keys):
    operator = keys.load_private(keys_dir / "operator.key")
    data = bundle_mod.build(manifest_for(digits_tflite_float), digits_tflite_float, operator)
    with pytest.raises(SignatureError, match="operator key; it needs a release key"):
        bundle_mod.verify(bundle_mod.parse_bundle(data), trusted_keys)


@pytest.mark.parametrize("keep", [0, 100, 1500, -700])
def test_truncated_bundle_is_reported_as_truncated(signed, keep):
    with pytest.raises(TruncatedBundleError):
        bundle_mod.parse_bundle(signed[:keep] if keep >= 0 else signed[:len(signed) + keep - 1024])


def test_read_bundle_names_the_file(tmp_path):
    path = tmp_path / "notes.lfb"
    path.write_text("not a bundle")
    with pytest.raises(BundleError, match="notes.lfb"):
        bundle_mod.read_bundle(path)


def test_manifest_with_unknown_field_is_rejected(digits_tflite_float):
    doc = manifest_for(digits_tflite_float)
    doc["quantisation"] = doc.pop("quantization")
    with pytest.raises(BundleError, match=r"quantisation: unknown key \(did you mean 'quantization'\?\)"):
        Manifest.from_dict(doc)


def test_manifest_chunk_count_must_match_size(digits_tflite_float):
    doc = manifest_for(digits_tflite_float)
    doc["model"]["chunks"] = doc["model"]["chunks"] * 2
    with pytest.raises(BundleError, match="model.chunks lists 2 hashes"):
        Manifest.from_dict(doc)


def test_private_key_is_0600_and_never_overwritten(tmp_path):
    private, public = keys.generate("operator", tmp_path, passphrase=b"s3cret")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="already exists"):
        keys.generate("operator", tmp_path)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_private(private, b"guess")
    with pytest.raises(KeyFileError, match="encrypted; give its passphrase"):
        keys.load_private(private)
    assert keys.load_private(private, b"s3cret").public_key() is not None


def test_every_shipped_profile_is_valid():
    names = profiles.available()
    assert {"rpi4-cpu", "rpi-zero2w-cpu", "coral-usb-edgetpu", "coral-devboard-edgetpu", "jetson-gpu",
            "x86-cpu"} <= set(names)
    coral = profiles.load_profile("coral-usb-edgetpu")
    assert coral.delegates[0].library == "libedgetpu.so.1" and coral.delegates[0].options == {"device": "usb"}
    assert coral.quantization["input_type"] == "uint8"
    assert profiles.load_profile("jetson-gpu").mode == "float16"


def _profile_text(name: str = "rpi4-cpu") -> str:
    return (profiles.default_profiles_dir() / f"{name}.toml").read_text()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("threads = 4", "thread = 4"), r"runtime.thread: unknown key \(did you mean 'threads'\?\)"),
    (lambda t: t.replace('mode = "int8"', 'mode = "int4"'), r"quantization.mode: 'int4' is not one of"),
    (lambda t: t.replace("cores = 4", 'cores = "four"'), r"hardware.cores: expected an integer"),
    (lambda t: t.replace('kind = "xnnpack"', 'kind = "gpu"\nlibrary = "x.so"'), r"delegates: the chain must end"),
    (lambda t: t.replace("max_model_bytes = 50_000_000\n", ""), r"budgets.max_model_bytes: required key is missing"),
    (lambda t: t + "\n[extra", r"not valid TOML"),
])
def test_profile_errors_name_file_and_field(tmp_path: Path, edit, message):
    path = tmp_path / "rpi4-cpu.toml"
    path.write_text(edit(_profile_text()))
    with pytest.raises(ProfileError, match=message) as info:
        profiles.load_profile("rpi4-cpu", tmp_path)
    assert str(path) in str(info.value)


def test_profile_name_must_match_its_file(tmp_path):
    (tmp_path / "pi.toml").write_text(_profile_text())
    with pytest.raises(ProfileError, match="file is named pi.toml"):
        profiles.load_profile("pi", tmp_path)


def test_unknown_profile_suggests_the_closest():
    with pytest.raises(ProfileError, match="did you mean 'rpi4-cpu'"):
        profiles.load_profile("rpi4cpu")
