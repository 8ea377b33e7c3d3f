"""Each validation check, provoked to fail on purpose with real models and real runtimes."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, profiles
from tests.conftest import ROOT, run_cli


def _noop(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, digits) -> tuple[Path, Path]:
    x_train, y_train, x_test, y_test = digits
    directory = tmp_path_factory.mktemp("data")
    np.savez(directory / "cal.npz", x=x_train[:200], y=y_train[:200])
    np.savez(directory / "eval.npz", x=x_test, y=y_test)
    return directory / "cal.npz", directory / "eval.npz"


@pytest.fixture(scope="module")
def source(digits_keras):
    from converter.models import load_source
    return load_source(digits_keras)


@pytest.fixture(scope="module")
def datasets(source, data_files):
    from converter.data import load_dataset
    cal, ev = data_files
    return (load_dataset(cal, source.input_shape, purpose="calibration"),
            load_dataset(ev, source.input_shape, purpose="eval"))


@pytest.fixture(scope="module")
def int8_conversion(source, datasets):
    from converter.quantize import convert
    return convert(source, mode="int8", input_type="int8", output_type="int8", calibration=datasets[0],
                   runtime_min_version="2.14", progress=_noop)


def with_budgets(profile, **budgets):
    return dataclasses.replace(profile, budgets={**profile.budgets, **budgets})


def test_good_int8_model_passes_every_check_and_reports_strict_json(source, datasets, int8_conversion):
    from converter.validate import validate
    report = validate(source, int8_conversion, profiles.load_profile("rpi4-cpu"), datasets[1],
                      calibration=datasets[0])
    assert report.ok(), report.summary()
    assert [c.name for c in report.checks] == ["accuracy", "ops", "runtimes", "budgets", "latency"]
    accuracy = report.check("accuracy").details
    assert accuracy["samples"] == len(datasets[1].x)
    assert accuracy["converted_accuracy"] > 0.9 and accuracy["top1_agreement"] > 0.95
    assert set(accuracy["per_class"]) == {str(i) for i in range(10)}
    runs = {r["runtime"]: r for r in report.check("runtimes").details["runs"]}
    assert runs["tflite-runtime"]["ok"] and runs["tflite-runtime"]["version"].startswith("2.14")
    doc = report.to_dict()
    json.dumps(doc, allow_nan=False)      # signed manifests are strict JSON
    assert doc["summary"].startswith("all checks passed") and "\n" not in doc["summary"]


def test_accuracy_drop_over_budget_names_the_worst_layers(source, datasets):
    """Calibrating on inputs 5x too dark clips the first conv's activations: accuracy falls."""
    from converter.data import Dataset
    from converter.quantize import convert
    from converter.validate import validate
    cal, ev = datasets
    dark = Dataset(x=(cal.x * 0.2).astype(np.float32), y=None, source="dark calibration")
    conversion = convert(source, mode="int8", input_type="int8", output_type="int8", calibration=dark,
                         runtime_min_version="2.14", progress=_noop)
    profile = with_budgets(profiles.load_profile("rpi4-cpu"), max_accuracy_drop=0.0)
    report = validate(source, conversion, profile, ev, calibration=dark)
    check = report.check("accuracy")
    assert not check.ok and report.failed() == ["accuracy"]
    assert check.details["drop_points"] > 1.0
    worst = check.details["worst_layers"]
    assert 1 <= len(worst) <= 5
    assert all(layer["op"] for layer in worst)
    # The debugger's layer names are the Keras layers of the digits CNN, worst first.
    assert "conv2d" in worst[0]["layer"] and worst[0]["op"] == "CONV_2D"
    assert worst[0]["rmse_over_scale"] >= worst[-1]["rmse_over_scale"]
    assert worst[0]["layer"] in check.summary


def test_op_too_new_for_the_runtime_fails_in_the_real_tflite_runtime(source, datasets, tflite214_python):
    """TF 2.21's default dynamic-range conversion emits FULLY_CONNECTED v12; tflite-runtime 2.14 refuses it."""
    import tensorflow as tf

    from converter.ops import model_ops
    from converter.quantize import Conversion
    from converter.validate import validate
    converter = tf.lite.TFLiteConverter.from_concrete_functions([source.concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    tflite = converter.convert()
    ops = model_ops(tflite)
    assert any(o.name == "FULLY_CONNECTED" and o.version == 12 for o in ops)
    conversion = Conversion(tflite=tflite, mode="dynamic", input_type="float32", output_type="float32",
                            calibration_samples=0, settings={}, ops=ops)
    profile = profiles.load_profile("x86-cpu")     # allows tflite-runtime, min_version 2.14
    report = validate(source, conversion, profile, datasets[1])
    ops_check, runtimes_check = report.check("ops"), report.check("runtimes")
    assert not ops_check.ok and "FULLY_CONNECTED v12" in ops_check.summary and "2.14" in ops_check.summary
    assert not runtimes_check.ok and not runtimes_check.forceable
    runs = {r["runtime"]: r for r in runtimes_check.details["runs"]}
    assert runs["ai-edge-litert"]["ok"]
    assert not runs["tflite-runtime"]["ok"] and "FULLY_CONNECTED" in runs["tflite-runtime"]["error"]
    assert "tflite-runtime" in runtimes_check.summary


@pytest.mark.parametrize("budget, words", [
    ({"max_model_bytes": 1000}, "model is"),
    ({"max_memory_bytes": 1000}, "memory"),
])
def test_size_and_memory_budgets(source, datasets, int8_conversion, budget, words):
    from converter.validate import validate
    profile = with_budgets(profiles.load_profile("rpi4-cpu"), **budget)
    report = validate(source, int8_conversion, profile, datasets[1])
    check = report.check("budgets")
    assert report.failed() == ["budgets"]
    assert words in check.summary and "over the" in check.summary
    assert check.details["model_bytes"] == len(int8_conversion.tflite)
    assert 0 < check.details["arena_bytes"] < check.details["peak_memory_bytes"]


def test_latency_over_bound(source, datasets, int8_conversion):
    from converter.validate import validate
    profile = with_budgets(profiles.load_profile("rpi4-cpu"), max_latency_ms=1e-6)
    report = validate(source, int8_conversion, profile, datasets[1])
    check = report.check("latency")
    assert report.failed() == ["latency"]
    assert "OVER" in check.summary and check.details["median_ms"] > 1e-6
    assert check.details["runs"] >= 10 and check.details["threads"] == profile.threads


def test_missing_tflite_runtime_environment_fails_and_says_how_to_fix(source, datasets, int8_conversion,
                                                                      monkeypatch, tmp_path):
    from converter.validate import validate
    monkeypatch.setenv("LITEFLEET_TFLITE214_PYTHON", str(tmp_path / "nowhere" / "python"))
    report = validate(source, int8_conversion, profiles.load_profile("rpi4-cpu"), datasets[1])
    check = report.check("runtimes")
    assert report.failed() == ["runtimes"] and not check.forceable
    assert "scripts/setup" in check.summary and "tflite-runtime" in check.summary


def test_no_data_leaves_accuracy_visible_but_not_failing(source, int8_conversion):
    from converter.validate import validate
    report = validate(source, int8_conversion, profiles.load_profile("rpi4-cpu"), None)
    check = report.check("accuracy")
    assert check.ok and "not measured" in check.summary and check.details["measured"] is False
    assert report.ok() and any("random" in n for n in report.notes)


# --force through the real CLI -------------------------------------------------------------

@pytest.fixture(scope="module")
def tight_profiles(tmp_path_factory) -> Path:
    """A copy of x86-cpu with an impossible latency bound."""
    directory = tmp_path_factory.mktemp("profiles")
    text = (ROOT / "firmware_profiles" / "x86-cpu.toml").read_text()
    text = text.replace('name = "x86-cpu"', 'name = "x86-tight"') + "max_latency_ms = 0.000001\n"
    (directory / "x86-tight.toml").write_text(text)
    return directory


@pytest.fixture(scope="module")
def force_runs(tmp_path_factory, digits_keras, data_files, keys_dir, tight_profiles):
    """Three conversions at once: without --force, with --force, and --force with no tflite-runtime env."""
    cal, ev = data_files
    base = tmp_path_factory.mktemp("force")
    common = [str(digits_keras), "--profile", "x86-tight", "--profiles-dir", str(tight_profiles),
              "--calibration", str(cal), "--eval", str(ev), "--name", "digits", "--version", "1",
              "--sign-key", str(keys_dir / "release.key")]
    jobs = {
        "refused": (["convert", *common, "-o", str(base / "refused")], None),
        "forced": (["convert", *common, "-o", str(base / "forced"), "--force"], None),
        "no_env": (["convert", *common, "-o", str(base / "no_env"), "--force"],
                   {"LITEFLEET_TFLITE214_PYTHON": str(base / "missing" / "python")}),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(run_cli, *args, env=env) for k, (args, env) in jobs.items()}
        return {k: (f.result(), base / k) for k, f in futures.items()}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_failed_check_refuses_to_sign_and_writes_nothing(force_runs):
    proc, out = force_runs["refused"]
    assert proc.returncode == 3, proc.stderr
    assert "FAIL  latency" in proc.stdout and "NOT signed" in proc.stdout
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "latency" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.iterdir())


def test_force_signs_and_records_the_forced_check(force_runs, keys_dir):
    proc, out = force_runs["forced"]
    assert proc.returncode == 0, proc.stderr
    assert "FORCED past failed checks: latency" in proc.stdout
    bundle = out / "digits-v1-x86-tight.lfb"
    trusted = [keys.load_public(keys_dir / "release.pub")]
    manifest = bundle_mod.verify(bundle_mod.read_bundle(bundle), trusted).manifest
    assert manifest.doc["forced"] == ["latency"]
    assert manifest.doc["validation"]["failed"] == ["latency"]
    report = json.loads((out / "digits-v1-x86-tight.report.json").read_text())
    assert report["forced"] == ["latency"] and report["signed"]
    inspect = run_cli("bundle", "inspect", str(bundle))
    assert "FORCED past failed checks: latency" in inspect.stdout


def test_force_never_signs_a_model_an_allowed_runtime_cannot_load(force_runs):
    proc, out = force_runs["no_env"]
    assert proc.returncode == 3, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "runtimes" in errors[0] and "scripts/setup" in errors[0]
    assert "cannot be forced" in errors[0]
    assert not out.exists() or not list(out.glob("*.lfb"))
