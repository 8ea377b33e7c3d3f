"""``litefleet keys``, ``bundle verify`` and ``profiles`` through the real command line."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# keys -------------------------------------------------------------------------------------

def test_keys_generate_writes_a_private_key_only_its_owner_can_read(tmp_path):
    proc = run_cli("keys", "generate", "--role", "release", "-o", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    private, public = Path(doc["private_key"]), Path(doc["public_key"])
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert doc["encrypted"] is False and len(doc["key_id"]) == 16


def test_keys_generate_refuses_to_overwrite(tmp_path):
    assert run_cli("keys", "generate", "--role", "operator", "-o", str(tmp_path)).returncode == 0
    before = (tmp_path / "operator.key").read_bytes()
    proc = run_cli("keys", "generate", "--role", "operator", "-o", str(tmp_path))
    assert proc.returncode != 0
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "operator.key" in errors[0] and "refusing to overwrite" in errors[0]
    assert (tmp_path / "operator.key").read_bytes() == before


@pytest.fixture(scope="module")
def encrypted_key(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("enc")
    proc = run_cli("keys", "generate", "--role", "release", "-o", str(directory), "--passphrase-env", "LF_PASS",
                   "--json", env={"LF_PASS": "correct horse"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["encrypted"] is True
    return directory / "release.key"


def test_passphrase_from_env_encrypts_the_key(encrypted_key):
    from agent.protocol import keys
    from agent.protocol.errors import KeyFileError
    assert b"ENCRYPTED" in encrypted_key.read_bytes()
    keys.load_private(encrypted_key, b"correct horse")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_private(encrypted_key, b"wrong")


def test_wrong_passphrase_at_convert_time_fails_before_converting(encrypted_key, tmp_path):
    """The key is checked first, so a typo costs a second, not a conversion."""
    model = tmp_path / "model.keras"
    model.write_bytes(b"never read: the key fails first")
    out = tmp_path / "out"
    proc = run_cli("convert", str(model), "--profile", "x86-cpu", "--name", "m", "--version", "1",
                   "--sign-key", str(encrypted_key), "--passphrase-env", "LF_PASS", "-o", str(out),
                   env={"LF_PASS": "Correct horse"})
    assert proc.returncode != 0
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and str(encrypted_key) in errors[0] and "wrong passphrase" in errors[0]
    assert "loading the model" not in proc.stderr and "converting" not in proc.stderr
    assert not out.exists()


def test_encrypted_key_without_passphrase_says_so(encrypted_key, tmp_path):
    proc = run_cli("convert", str(tmp_path / "m.keras"), "--profile", "x86-cpu", "--name", "m", "--version", "1",
                   "--sign-key", str(encrypted_key), "-o", str(tmp_path / "out"))
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1 and "encrypted" in errors[0] and "passphrase" in errors[0]


# bundle verify ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory, digits_tflite_int8, release_key) -> Path:
    from tests.support.bundles import make_bundle
    return make_bundle(tmp_path_factory.mktemp("signed") / "digits-v1-rpi4-cpu.lfb", digits_tflite_int8,
                       release_key, profile="rpi4-cpu", mode="int8")


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _repack(path: Path, members: dict[str, bytes]) -> Path:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    return path


def _verify(bundle: Path, trust: Path):
    return run_cli("bundle", "verify", str(bundle), "--trust", str(trust))


def test_verify_accepts_the_untouched_bundle(signed_bundle, keys_dir):
    proc = _verify(signed_bundle, keys_dir / "release.pub")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_verify_rejects_a_tampered_model(signed_bundle, keys_dir, tmp_path):
    members = _members(signed_bundle)
    model = bytearray(members["model.tflite"])
    model[len(model) // 2] ^= 0x01
    members["model.tflite"] = bytes(model)
    proc = _verify(_repack(tmp_path / "tampered.lfb", members), keys_dir / "release.pub")
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1
    assert "chunk 0" in errors[0] and "does not match" in errors[0]


def test_verify_rejects_a_tampered_manifest(signed_bundle, keys_dir, tmp_path):
    members = _members(signed_bundle)
    manifest = json.loads(members["manifest.json"])
    manifest["version"] = 99
    members["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    proc = _verify(_repack(tmp_path / "tampered.lfb", members), keys_dir / "release.pub")
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1 and "signature" in errors[0].lower()


def test_verify_rejects_a_bundle_signed_by_another_key(signed_bundle, tmp_path):
    assert run_cli("keys", "generate", "--role", "release", "-o", str(tmp_path / "other")).returncode == 0
    proc = _verify(signed_bundle, tmp_path / "other" / "release.pub")
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1
    assert "key" in errors[0] and "manifest" in errors[0]


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_verify_rejects_a_truncated_file(signed_bundle, keys_dir, tmp_path, keep):
    data = signed_bundle.read_bytes()
    cut = tmp_path / "cut.lfb"
    cut.write_bytes(data[: int(len(data) * keep)])
    proc = _verify(cut, keys_dir / "release.pub")
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1
    assert str(cut) in errors[0] and "truncated" in errors[0]


# profiles ---------------------------------------------------------------------------------

def test_profiles_list_and_show_json():
    proc = run_cli("profiles", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    names = [p["name"] for p in json.loads(proc.stdout)]
    assert names == sorted(p.stem for p in (ROOT / "firmware_profiles").glob("*.toml"))
    proc = run_cli("profiles", "show", "coral-usb-edgetpu", "--json")
    doc = json.loads(proc.stdout)
    assert doc["quantization"]["mode"] == "int8" and doc["delegates"][0]["kind"] == "edgetpu"


def test_profile_with_an_unknown_key_names_the_file_and_the_key(tmp_path):
    text = (ROOT / "firmware_profiles" / "x86-cpu.toml").read_text().replace("threads = 2", "threads = 2\nthreds = 4")
    (tmp_path / "x86-cpu.toml").write_text(text)
    for args in (("list",), ("show", "x86-cpu")):
        proc = run_cli("profiles", "--dir", str(tmp_path), *args)
        errors = _error_lines(proc.stderr)
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr
        assert str(tmp_path / "x86-cpu.toml") in errors[0] and "runtime.threds" in errors[0]
        assert "did you mean 'threads'" in errors[0]


def test_unknown_profile_names_it_and_suggests():
    proc = run_cli("profiles", "show", "rpi4-cpus")
    errors = _error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1 and "'rpi4-cpus'" in errors[0] and "rpi4-cpu" in errors[0]
