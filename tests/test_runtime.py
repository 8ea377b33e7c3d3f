"""The runtime shim and the engine on the CPU: selection, reporting, threads, predict, workers, smoke test.

Everything runs real interpreters on the digits models trained once per session; the
tflite-runtime 2.14 checks run in its own environment (numpy<2) as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.engine import load_model, smoke_test
from agent.errors import InferenceError, ModelLoadError, RuntimeUnavailableError, SmokeTestError
from agent.protocol.manifest import Manifest
from agent.protocol.profiles import load_profile
from agent.runtime import available_runtimes, select_runtime
from tests.support.bundles import manifest_for, tensor
from tests.support.plugins import accelerator_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rpi4():
    return load_profile("rpi4-cpu")


@pytest.fixture(scope="module")
def int8_manifest(digits_tflite_int8) -> Manifest:
    return Manifest.from_dict(manifest_for(digits_tflite_int8, profile="rpi4-cpu", mode="int8"))


@pytest.fixture(scope="module")
def int8_model(digits_tflite_int8, int8_manifest, rpi4):
    loaded = load_model(digits_tflite_int8, int8_manifest, rpi4, workers=2)
    yield loaded
    loaded.close()


def _raw_interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model, num_threads=1)
    interp.allocate_tensors()
    return interp


# --- runtime shim -----------------------------------------------------------------------------


def test_prefers_ai_edge_litert_and_reports_its_version():
    runtime = select_runtime()
    assert runtime.name == "ai-edge-litert"
    assert runtime.version == importlib.metadata.version("ai-edge-litert")
    assert runtime.interpreter_class.__module__ == "ai_edge_litert.interpreter"
    assert available_runtimes() == ["ai-edge-litert", "tensorflow"]   # no tflite-runtime in this venv


def test_allowed_list_is_respected_and_tensorflow_lite_is_the_last_resort(digits_tflite_int8, int8_manifest, rpi4):
    runtime = select_runtime(["tensorflow"])
    assert runtime.name == "tensorflow"
    import tensorflow as tf
    assert runtime.version == tf.__version__
    loaded = load_model(digits_tflite_int8, int8_manifest, rpi4, runtime=runtime)
    assert loaded.report.runtime == "tensorflow"
    assert smoke_test(loaded) <= 2


def test_no_allowed_runtime_importable_names_each_one():
    with pytest.raises(RuntimeUnavailableError) as err:
        select_runtime(["tflite-runtime"])
    message = str(err.value)
    assert "tflite-runtime (ModuleNotFoundError" in message
    assert "not allowed by the profile: ai-edge-litert, tensorflow" in message
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'tflite'"):
        select_runtime(["tflite"])


def test_agent_modules_never_import_tensorflow_at_top_level():
    """The CI rule: a device has no tensorflow, so agent/ only reaches it through importlib."""
    import re
    pattern = re.compile(r"^\s*(import tensorflow|from tensorflow)")
    for name in ("runtime.py", "engine.py", "tflite_graph.py"):
        lines = (ROOT / "agent" / name).read_text().splitlines()
        assert not [line for line in lines if pattern.match(line)], name


# --- reporting and threads --------------------------------------------------------------------


def test_report_says_what_runs_where(int8_model):
    report = int8_model.report
    assert (report.runtime, report.delegate, report.threads, report.workers) == ("ai-edge-litert", "xnnpack", 4, 2)
    assert report.total_nodes == 7
    assert 0 < report.delegated_nodes <= 7
    assert report.full_graph == (report.delegated_nodes == 7)
    assert [a.outcome for a in report.attempts] == ["used"]
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["attempts"][0]["kind"] == "xnnpack" and doc["runtime_version"] == report.runtime_version
    assert (int8_model.name, int8_model.version) == ("digits", 1)


_THREADS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, psutil
    from agent.engine import load_model
    from agent.protocol.manifest import Manifest
    from agent.protocol.profiles import load_profile_file
    model = open(sys.argv[1], "rb").read()
    manifest = Manifest.from_dict(json.load(open(sys.argv[2])))
    profile = load_profile_file(sys.argv[3])
    process = psutil.Process()
    before = process.num_threads()
    loaded = load_model(model, manifest, profile)
    loaded.predict_raw([np.zeros(loaded.input_specs[0].shape, loaded.input_specs[0].dtype)])
    print(json.dumps({"extra_threads": process.num_threads() - before, "threads": loaded.report.threads,
                      "runtime": loaded.report.runtime}))
""")


def _write_inputs(tmp_path: Path, model: bytes, manifest: Manifest) -> tuple[Path, Path, Path]:
    model_path = tmp_path / "model.tflite"
    model_path.write_bytes(model)
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(manifest.doc))
    script = tmp_path / "script.py"
    return model_path, manifest_path, script


@pytest.mark.parametrize("threads", [1, 3])
def test_profile_thread_count_is_honoured(tmp_path, digits_tflite_int8, int8_manifest, threads):
    """The interpreter's CPU thread pool has the profile's size (ai-edge-litert defaults to 1):
    a fresh process gains threads-1 pool threads when the model first runs."""
    model_path, manifest_path, script = _write_inputs(tmp_path, digits_tflite_int8, int8_manifest)
    script.write_text(_THREADS_SCRIPT)
    profile = accelerator_profile(tmp_path, base="rpi4-cpu", library="", threads=threads)
    result = subprocess.run([sys.executable, str(script), str(model_path), str(manifest_path), profile.path],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"extra_threads": threads - 1, "threads": threads, "runtime": "ai-edge-litert"}


# --- predict ----------------------------------------------------------------------------------


def test_predict_quantizes_and_dequantizes_like_the_raw_interpreter(int8_model, digits_tflite_int8, digits):
    interp = _raw_interpreter(digits_tflite_int8)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    _, _, x_test, y_test = digits
    correct = 0
    for image, label in zip(x_test[:40], y_test[:40]):
        q = np.clip(np.round(image / in_scale + in_zero), -128, 127).astype(np.int8)[None]
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        raw = interp.get_tensor(out["index"])
        np.testing.assert_array_equal(int8_model.predict_raw([q])[0], raw)
        probs = int8_model.predict([image[None]])[0]
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, (raw.astype(np.float32) - out_zero) * out_scale, rtol=0, atol=1e-7)
        correct += int(np.argmax(probs) == label)
    assert correct >= 36   # the model is accurate, so the dequantized values mean something
    # already-quantized input passes through predict() unchanged
    np.testing.assert_array_equal(int8_model.predict([q])[0], probs)


def test_float_model_predict_matches_raw_interpreter(digits_tflite_float, digits, rpi4):
    manifest = Manifest.from_dict(manifest_for(digits_tflite_float, profile="rpi4-cpu"))
    loaded = load_model(digits_tflite_float, manifest, rpi4)
    interp = _raw_interpreter(digits_tflite_float)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    image = digits[2][0][None]
    interp.set_tensor(inp["index"], image)
    interp.invoke()
    want = interp.get_tensor(out["index"])
    np.testing.assert_allclose(loaded.predict([image])[0], want, atol=1e-5)
    np.testing.assert_allclose(loaded.predict([image.astype(np.float64)])[0], want, atol=1e-5)  # JSON gives float64
    np.testing.assert_allclose(loaded.predict_raw([image])[0], want, atol=1e-5)


def test_bad_inputs_are_400_naming_the_tensor(int8_model):
    good = np.zeros((1, 8, 8, 1), np.float32)
    cases = [
        (lambda: int8_model.predict([np.zeros((1, 8, 8), np.float32)]), "'image': expected shape [1, 8, 8, 1], got [1, 8, 8]"),
        (lambda: int8_model.predict_raw([good]), "'image': expected dtype int8, got float32"),
        (lambda: int8_model.predict([good.astype(np.int32)]), "expected dtype int8 (raw) or float values to quantize, got int32"),
        (lambda: int8_model.predict([good, good]), "takes 1 input(s) ['image' (shape [1, 8, 8, 1], dtype int8)], got 2"),
        (lambda: int8_model.predict([]), "got 0"),
    ]
    for call, text in cases:
        with pytest.raises(InferenceError) as err:
            call()
        assert err.value.status == 400
        assert text in str(err.value)


def test_workers_in_parallel_threads_give_correct_answers(int8_model, digits):
    images = digits[2][:64]
    expected = [int8_model.predict([image[None]])[0] for image in images]
    errors: list[str] = []
    start = threading.Barrier(4)

    def hammer(offset: int) -> None:
        start.wait(timeout=30)
        for round_ in range(3):
            for i in range(len(images)):
                j = (i + offset) % len(images)
                got = int8_model.predict([images[j][None]])[0]
                if not np.array_equal(got, expected[j]):
                    errors.append(f"thread {offset} round {round_} image {j}")

    threads = [threading.Thread(target=hammer, args=(k * 16,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert int8_model.report.workers == 2


def test_closed_model_answers_503(digits_tflite_int8, int8_manifest, rpi4):
    loaded = load_model(digits_tflite_int8, int8_manifest, rpi4)
    loaded.close()
    with pytest.raises(InferenceError) as err:
        loaded.predict([np.zeros((1, 8, 8, 1), np.float32)])
    assert err.value.status == 503


def test_unloadable_model_is_model_load_error(int8_manifest, rpi4):
    with pytest.raises(ModelLoadError, match=r"model digits v1 cannot be loaded by ai-edge-litert [\d.]+ on the CPU"):
        load_model(b"this is not a flatbuffer at all" * 10, int8_manifest, rpi4)


# --- smoke test -------------------------------------------------------------------------------


def test_smoke_test_passes_on_the_expected_output(int8_model):
    assert 0.0 <= smoke_test(int8_model) <= int8_model.manifest.doc["smoke_test"]["atol"]


def test_smoke_test_fails_naming_output_and_diff(digits_tflite_int8, rpi4):
    good = manifest_for(digits_tflite_int8, profile="rpi4-cpu", mode="int8")
    import base64
    out = good["smoke_test"]["expected_outputs"][0]
    values = np.frombuffer(base64.b64decode(out["data"]), np.int8).reshape(out["shape"]).astype(np.int16)
    wrong = np.clip(values + 50, -128, 127).astype(np.int8)
    good["smoke_test"]["expected_outputs"] = [tensor(wrong)]
    manifest = Manifest.from_dict(good)
    loaded = load_model(digits_tflite_int8, manifest, rpi4)
    with pytest.raises(SmokeTestError) as err:
        smoke_test(loaded)
    message = str(err.value)
    assert "output 0 ('Identity')" in message and "more than atol 2" in message
    assert "differs from the expected output by 50, more than atol 2" in message


def test_smoke_test_with_float_expected_output_compares_dequantized(digits_tflite_int8, rpi4):
    """A float expected output (what a converter measured in real units) is compared after dequantizing."""
    doc = manifest_for(digits_tflite_int8, profile="rpi4-cpu", mode="int8")
    loaded = load_model(digits_tflite_int8, Manifest.from_dict(doc), rpi4)
    sample = np.frombuffer(__import__("base64").b64decode(doc["smoke_test"]["inputs"][0]["data"]), np.int8).reshape(1, 8, 8, 1)
    real = loaded.predict([sample])[0]
    doc["smoke_test"]["expected_outputs"] = [tensor(real)]
    doc["smoke_test"]["atol"] = 0.01
    ok = load_model(digits_tflite_int8, Manifest.from_dict(doc), rpi4)
    assert smoke_test(ok) < 1e-6
    doc["smoke_test"]["expected_outputs"] = [tensor((real + 0.5).astype(np.float32))]
    bad = load_model(digits_tflite_int8, Manifest.from_dict(doc), rpi4)
    with pytest.raises(SmokeTestError, match="by 0.5"):
        smoke_test(bad)


# --- tflite-runtime 2.14 ----------------------------------------------------------------------

_TFLITE214_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from agent.engine import load_model, smoke_test
    from agent.events import EventLog
    from agent.protocol.manifest import Manifest
    from agent.protocol.profiles import load_profile_file
    model = open(sys.argv[1], "rb").read()
    manifest = Manifest.from_dict(json.load(open(sys.argv[2])))
    sample = np.load(sys.argv[3])
    result = {"numpy": np.__version__, "loads": []}
    for profile_path in sys.argv[4:]:
        log = EventLog()
        loaded = load_model(model, manifest, load_profile_file(profile_path), events=log)
        result["loads"].append({
            "report": loaded.report.to_dict(),
            "events": log.kinds(),
            "raw": loaded.predict_raw([sample])[0].tolist(),
            "real": loaded.predict([sample])[0].tolist(),
            "smoke": smoke_test(loaded),
        })
    try:
        import tensorflow
        result["tensorflow"] = True
    except ImportError:
        result["tensorflow"] = False
    print(json.dumps(result))
""")


@pytest.mark.tflite_runtime
def test_engine_on_tflite_runtime_214(tmp_path, tflite214_python, delegate_plugin, digits_tflite_int8, int8_manifest, int8_model, digits):
    """The same engine under tflite-runtime 2.14 (no ai-edge-litert, no tensorflow): it is chosen,
    reported, gives the same answers, and the delegate fallbacks work with its load_delegate too."""
    model_path, manifest_path, script = _write_inputs(tmp_path, digits_tflite_int8, int8_manifest)
    script.write_text(_TFLITE214_SCRIPT)
    image = digits[2][3]
    spec = int8_model.input_specs[0]
    sample = spec.quantize(image[None])
    np.save(tmp_path / "sample.npy", sample)
    profiles = []
    for name, options in [("cpu", None), ("null", {"mode": "null"}), ("wrong", {"mode": "wrong"}), ("ok", {"device": "usb"})]:
        directory = tmp_path / name
        directory.mkdir()
        if name == "cpu":
            profiles.append(accelerator_profile(directory, base="rpi4-cpu", library="").path)
        else:
            profiles.append(accelerator_profile(directory, library=str(delegate_plugin), options=options,
                                                requires_compiled_model=False).path)
    missing = tmp_path / "missing"
    missing.mkdir()
    profiles.append(accelerator_profile(missing, library=str(missing / "libedgetpu.so.1"), requires_compiled_model=False).path)
    result = subprocess.run([str(tflite214_python), str(script), str(model_path), str(manifest_path),
                             str(tmp_path / "sample.npy"), *profiles],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tensorflow"] is False and out["numpy"].startswith("1.")
    want_raw = int8_model.predict_raw([sample])[0]
    want_real = int8_model.predict([sample])[0]
    outcomes = []
    for load in out["loads"]:
        report = load["report"]
        assert (report["runtime"], report["runtime_version"]) == ("tflite-runtime", "2.14.0")
        # integer kernels of both runtimes agree to one quantization step
        assert np.max(np.abs(np.array(load["raw"]) - want_raw.astype(int))) <= 1
        np.testing.assert_allclose(load["real"], want_real, atol=1 / 256 + 1e-6)
        assert load["smoke"] <= 2
        outcomes.append(([a["outcome"] for a in report["attempts"]], report["delegate"], load["events"]))
    assert outcomes == [
        (["used"], "xnnpack", []),
        (["no_device", "used"], "xnnpack", ["delegate_fallback"]),
        (["wrong_output", "used"], "xnnpack", ["accelerator_mismatch", "delegate_fallback"]),
        (["used"], "edgetpu", []),
        (["missing", "used"], "xnnpack", ["delegate_fallback"]),
    ]
