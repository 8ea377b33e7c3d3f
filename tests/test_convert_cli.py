"""``litefleet convert`` end to end: real conversions of the digits CNN for every device profile,
checked with ``litefleet bundle verify`` / ``inspect``, and bad input refused with one clear line.

The Edge TPU profiles run with --skip-edgetpu-compile: there is no edgetpu_compiler on this host.
"""

from __future__ import annotations

import base64
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.protocol import profiles
from tests.conftest import ROOT, run_cli

PROFILES = profiles.available(ROOT / "firmware_profiles")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, digits) -> tuple[Path, Path]:
    x_train, y_train, x_test, y_test = digits
    directory = tmp_path_factory.mktemp("data")
    np.savez(directory / "cal.npz", x=x_train[:200], y=y_train[:200])
    np.savez(directory / "eval.npz", x=x_test, y=y_test)
    return directory / "cal.npz", directory / "eval.npz"


def convert_args(model, profile: str, out: Path, keys_dir: Path, *extra: str, data=None, version: int = 1) -> list[str]:
    args = ["convert", str(model), "--profile", profile, "--name", "digits", "--version", str(version),
            "--sign-key", str(keys_dir / "release.key"), "-o", str(out), "--json"]
    if data is not None:
        args += ["--calibration", str(data[0]), "--eval", str(data[1])]
    return args + list(extra)


def run_parallel(jobs: dict[str, list[str]], env: dict | None = None) -> dict:
    with ThreadPoolExecutor(3) as pool:
        futures = {key: pool.submit(run_cli, *args, env=env) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, digits_keras, data_files, keys_dir, digits_tflite_int8):
    """One real conversion per profile, plus a --mode override and a .tflite input, run three at a time."""
    base = tmp_path_factory.mktemp("bundles")
    tflite_path = base / "digits_int8.tflite"
    tflite_path.write_bytes(digits_tflite_int8)
    jobs = {p: convert_args(digits_keras, p, base / p, keys_dir, "--skip-edgetpu-compile", data=data_files)
            for p in PROFILES}
    # No --eval here: accuracy is then measured on the calibration data, and the report says so.
    jobs["mode-override"] = convert_args(digits_keras, "x86-cpu", base / "mode-override", keys_dir,
                                         "--mode", "float16", "--calibration", str(data_files[0]))
    # No --json here: this run also shows the human report.
    jobs["tflite-input"] = ["convert", str(tflite_path), "--profile", "rpi4-cpu", "--eval", str(data_files[1]),
                            "--name", "digits", "--version", "1", "--sign-key", str(keys_dir / "release.key"),
                            "-o", str(base / "tflite-input")]
    procs = run_parallel(jobs)
    return {key: (proc, base / key) for key, proc in procs.items()}, tflite_path


def _bundle(out: Path) -> Path:
    found = list(out.glob("*.lfb"))
    assert len(found) == 1, found
    return found[0]


def _inspect(bundle: Path) -> dict:
    proc = run_cli("bundle", "inspect", str(bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["manifest"]


def _array(doc: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(doc["data"]), dtype=doc["dtype"]).reshape(doc["shape"])


@pytest.mark.parametrize("profile_name", PROFILES)
def test_every_profile_converts_validates_signs_and_verifies(conversions, profile_name, keys_dir):
    proc, out = conversions[0][profile_name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)                      # --json: the report on stdout, nothing else
    profile = profiles.load_profile(profile_name)
    bundle = out / f"digits-v1-{profile_name}.lfb"
    report = out / f"digits-v1-{profile_name}.report.json"
    assert doc["ok"] and doc["bundle"] == str(bundle) and bundle.is_file()
    assert json.loads(report.read_text()) == doc      # the same facts beside the bundle
    assert sorted(p.name for p in out.iterdir()) == sorted([bundle.name, report.name])

    verify = run_cli("bundle", "verify", str(bundle), "--trust", str(keys_dir / "release.pub"))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr

    manifest = _inspect(bundle)
    quant = manifest["quantization"]
    assert (quant["mode"], quant["input_type"], quant["output_type"]) == (
        profile.mode, profile.quantization["input_type"], profile.quantization["output_type"])
    assert manifest["inputs"][0]["dtype"] == profile.quantization["input_type"]
    assert manifest["outputs"][0]["shape"] == [1, 10]
    summary = manifest["validation"]["summary"]
    assert summary.startswith("all checks passed") and "accuracy:" in summary and "\n" not in summary
    assert manifest["validation"] == doc["validation"]
    assert manifest["forced"] == []
    assert manifest["estimates"]["arena_bytes"] > 0
    assert manifest["producer"]["tensorflow"].startswith("2.21")
    if profile.mode == "int8":
        assert quant["calibration_samples"] == 200
        assert manifest["inputs"][0]["quantization"]["scale"][0] > 0
    accel = manifest["accelerator"]
    if profile.accelerator["kind"] == "edgetpu":
        assert accel["target"] == "cpu" and accel["compiled"] is False and "CPU" in accel["note"]
    elif profile.accelerator["kind"] == "gpu":
        assert accel["target"] == "gpu" and accel["ops_mapped"] == accel["ops_total"] > 0
    else:
        assert accel["target"] == "cpu"


@pytest.mark.parametrize("profile_name", PROFILES)
def test_smoke_test_is_a_real_sample_that_the_model_reproduces(conversions, profile_name, digits):
    """What the device will check on install: the manifest's sample gives the expected output."""
    from agent.protocol import bundle as bundle_mod
    from ai_edge_litert.interpreter import Interpreter
    _, out = conversions[0][profile_name]
    parts = bundle_mod.read_bundle(_bundle(out))
    smoke = json.loads(parts.manifest_bytes)["smoke_test"]
    sample, expected = _array(smoke["inputs"][0]), _array(smoke["expected_outputs"][0])
    interp = Interpreter(model_content=parts.model)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    assert sample.dtype == detail["dtype"] and list(sample.shape) == list(detail["shape"])
    interp.set_tensor(detail["index"], sample)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))) <= smoke["atol"]
    # The sample is a real test image (quantized to the model's input), not noise.
    x_test = digits[2]
    scale_zp = detail["quantization"]
    real = (sample.astype(np.float32) - scale_zp[1]) * scale_zp[0] if scale_zp[0] else sample
    assert np.min(np.abs(x_test - real.reshape(x_test.shape[1:])).reshape(len(x_test), -1).max(axis=1)) < 0.01


def test_mode_override_is_recorded_and_missing_eval_uses_calibration_data(conversions):
    proc, out = conversions[0]["mode-override"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _inspect(_bundle(out))
    assert manifest["quantization"]["mode"] == "float16"
    assert manifest["quantization"]["settings"]["supported_types"] == ["float16"]
    doc = json.loads(proc.stdout)
    assert doc["quantization"]["mode"] == "float16"
    accuracy = {c["name"]: c for c in doc["validation"]["checks"]}["accuracy"]
    assert accuracy["ok"] and "calibration data (no --eval given)" in accuracy["summary"]
    assert accuracy["details"]["samples"] == 200


def test_tflite_input_is_validated_and_signed_without_reconversion(conversions, digits_tflite_int8):
    proc, out = conversions[0]["tflite-input"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _inspect(_bundle(out))
    assert manifest["model"]["sha256"] == hashlib.sha256(digits_tflite_int8).hexdigest()
    assert manifest["quantization"]["mode"] == "int8"
    assert manifest["quantization"]["settings"].get("converted") is False
    checks = {c["name"]: c for c in manifest["validation"]["checks"]}
    assert checks["accuracy"]["details"]["samples"] > 0 and checks["runtimes"]["ok"]


def test_human_report_without_json(conversions):
    """The human report lists each check on stdout; progress goes to stderr; no terminal codes in a pipe."""
    proc, _ = conversions[0]["tflite-input"]
    for check in ("accuracy", "ops", "runtimes", "budgets", "latency"):
        assert f"PASS  {check}" in proc.stdout
    assert "signed bundle:" in proc.stdout and "digits-v1-rpi4-cpu.lfb" in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "loading the model" in proc.stderr and "loading the model" not in proc.stdout


def test_version_must_increase(conversions, digits_keras, keys_dir, data_files):
    _, out = conversions[0]["x86-cpu"]
    before = sorted(out.iterdir())
    proc = run_cli(*convert_args(digits_keras, "x86-cpu", out, keys_dir, data=data_files))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--version 1" in errors[0] and "must increase" in errors[0]
    assert sorted(out.iterdir()) == before


# Bad input: one line naming the thing, non-zero exit, nothing in the output folder ---------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, digits_keras, data_files, keys_dir, digits):
    base = tmp_path_factory.mktemp("bad")
    cal, ev = data_files
    not_a_model = base / "notes.keras"
    not_a_model.write_text("this is not a model\n")
    wrong_shape = base / "wrong_shape.npz"
    np.savez(wrong_shape, x=np.zeros((20, 4, 4, 1), np.float32))
    wrong_dtype = base / "wrong_dtype.npz"
    np.savez(wrong_dtype, x=np.full((20, 8, 8, 1), "a"))
    nan_eval = base / "nan_eval.npz"
    x = digits[2][:50].copy()
    x[7, 3, 3, 0] = np.nan
    np.savez(nan_eval, x=x, y=digits[3][:50])
    profile_dir = base / "profiles"
    profile_dir.mkdir()
    (profile_dir / "rpi4-cpu.toml").write_text((ROOT / "firmware_profiles" / "rpi4-cpu.toml").read_text()
                                               + "max_latncy_ms = 5.0\n")

    def job(name: str, *args: str) -> list[str]:
        return ["convert", str(digits_keras), "--name", "digits", "--version", "1", "-o", str(base / name / "out"),
                *args]

    key = ["--sign-key", str(keys_dir / "release.key")]
    jobs = {
        "not_a_model": (["convert", str(not_a_model), "--profile", "x86-cpu", "--name", "digits", "--version", "1",
                         *key, "-o", str(base / "not_a_model" / "out")], str(not_a_model)),
        "wrong_shape": (job("wrong_shape", "--profile", "rpi4-cpu", "--calibration", str(wrong_shape), *key),
                        str(wrong_shape)),
        "wrong_dtype": (job("wrong_dtype", "--profile", "rpi4-cpu", "--calibration", str(wrong_dtype), *key),
                        str(wrong_dtype)),
        "nan": (job("nan", "--profile", "rpi4-cpu", "--calibration", str(cal), "--eval", str(nan_eval), *key),
                "NaN"),
        "unknown_profile": (job("unknown_profile", "--profile", "rpi5-npu", *key), "'rpi5-npu'"),
        "unknown_key": (job("unknown_key", "--profile", "rpi4-cpu", "--profiles-dir", str(profile_dir), *key),
                        "max_latncy_ms"),
        "missing_key": (job("missing_key", "--profile", "x86-cpu", "--sign-key", str(base / "no" / "release.key")),
                        str(base / "no" / "release.key")),
    }
    procs = run_parallel({k: args for k, (args, _) in jobs.items()})
    return {k: (procs[k], names, base / k / "out") for k, (_, names) in jobs.items()}


@pytest.mark.parametrize("case", ["not_a_model", "wrong_shape", "wrong_dtype", "nan", "unknown_profile",
                                  "unknown_key", "missing_key"])
def test_bad_input_gives_one_clear_line_and_no_bundle(bad_inputs, case):
    proc, names, out = bad_inputs[case]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("litefleet: error:") and names in errors[0]
    assert not out.exists() or not list(out.iterdir())
    if case == "unknown_key":
        assert "rpi4-cpu.toml" in errors[0]
    if case in ("wrong_shape", "wrong_dtype"):
        assert ("shape" if case == "wrong_shape" else "dtype") in errors[0]
