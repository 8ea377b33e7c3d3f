"""Real conversions of the digits CNN in every mode, and the choice of settings that fit the runtime."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from converter.data import load_dataset
from converter.errors import ConversionError
from converter.models import load_source
from converter.ops import model_ops
from converter.quantize import DENSE_FLAG, convert, infer_mode
from tests.converter_fixtures import *  # noqa: F401,F403

CASES = [  # mode, I/O type, ops that must be there
    ("float32", "float32", {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}),
    ("float16", "float32", {"DEQUANTIZE", "CONV_2D", "FULLY_CONNECTED"}),
    ("dynamic", "float32", {"CONV_2D", "FULLY_CONNECTED"}),
    ("int8", "int8", {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}),
    ("int8", "uint8", {"QUANTIZE", "CONV_2D", "FULLY_CONNECTED"}),
    ("int16x8", "int16", {"CONV_2D", "FULLY_CONNECTED"}),
    ("int16x8", "float32", {"QUANTIZE", "DEQUANTIZE", "CONV_2D"}),
]


@pytest.fixture(scope="module")
def calibration(digits_npz, digits_source):
    return load_dataset(digits_npz[0], digits_source.input_shape, purpose="calibration", limit=100)


def _run(source, mode, io, calibration, runtime="2.14"):
    messages: list[str] = []
    conversion = convert(source, mode=mode, input_type=io, output_type=io, calibration=calibration,
                         runtime_min_version=runtime, progress=messages.append)
    return conversion, messages


def _interpreter(tflite: bytes):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=tflite)
    interp.allocate_tensors()
    return interp


def _accuracy(interp, x, y) -> float:
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    hits = 0
    for sample, label in zip(x, y):
        batch = sample[None]
        if np.issubdtype(inp["dtype"], np.integer):
            scale, zero = inp["quantization"]
            batch = np.round(batch / scale + zero)
        interp.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interp.invoke()
        hits += int(interp.get_tensor(out["index"])[0].argmax() == label)
    return hits / len(y)


@pytest.mark.parametrize("mode, io, expected_ops", CASES, ids=[f"{m}-{io}" for m, io, _ in CASES])
def test_every_mode_converts_with_batch_one_and_the_requested_types(digits_source, calibration, digits,
                                                                    mode, io, expected_ops):
    conversion, messages = _run(digits_source, mode, io, calibration)
    assert conversion.mode == mode and conversion.input_type == io and conversion.output_type == io
    interp = _interpreter(conversion.tflite)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape_signature"]) == [1, 8, 8, 1]          # fixed batch, no -1
    assert np.dtype(inp["dtype"]).name == io and np.dtype(out["dtype"]).name == io
    assert expected_ops <= {op.name for op in conversion.ops}
    assert conversion.ops == model_ops(conversion.tflite)
    assert infer_mode(conversion.tflite) == mode
    assert conversion.settings["batch_size"] == 1
    if mode in ("int8", "int16x8"):
        assert conversion.calibration_samples == 100
        assert conversion.settings["inference_input_type"] == io
        calibrating = [m for m in messages if m.startswith("calibrating")]
        assert calibrating[0].startswith("calibrating: 10/100") and calibrating[-1].endswith("(100%)")
    else:
        assert conversion.calibration_samples == 0
    x, y = digits[2][:150], digits[3][:150]
    assert _accuracy(interp, x, y) > 0.85


def test_dynamic_mode_for_runtime_2_14_retries_with_the_dense_flag(digits_source):
    conversion, messages = _run(digits_source, "dynamic", "float32", None, runtime="2.14")
    fc = next(op for op in conversion.ops if op.name == "FULLY_CONNECTED")
    assert fc.version <= 9
    assert conversion.settings[DENSE_FLAG] is True
    assert "FULLY_CONNECTED v12 needs runtime 2.17.0" in conversion.settings["runtime_retry"]
    assert any(m.startswith("retrying with " + DENSE_FLAG) for m in messages)


def test_dynamic_mode_for_runtime_2_17_keeps_the_default_settings(digits_source):
    conversion, messages = _run(digits_source, "dynamic", "float32", None, runtime="2.17")
    fc = next(op for op in conversion.ops if op.name == "FULLY_CONNECTED")
    assert fc.version == 12
    assert DENSE_FLAG not in conversion.settings and "runtime_retry" not in conversion.settings
    assert not any(m.startswith("retrying") for m in messages)


@pytest.mark.tflite_runtime
def test_the_retried_dynamic_model_really_loads_in_tflite_runtime_2_14(digits_source, tflite214_python, tmp_path):
    conversion, _ = _run(digits_source, "dynamic", "float32", None, runtime="2.14")
    path = tmp_path / "dynamic.tflite"
    path.write_bytes(conversion.tflite)
    script = ("import sys, numpy as np; from tflite_runtime.interpreter import Interpreter; "
              "i = Interpreter(model_path=sys.argv[1]); i.allocate_tensors(); "
              "d = i.get_input_details()[0]; i.set_tensor(d['index'], np.zeros(d['shape'], np.float32)); "
              "i.invoke(); print(i.get_tensor(i.get_output_details()[0]['index']).shape)")
    proc = subprocess.run([str(tflite214_python), "-c", script, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(1, 10)" in proc.stdout


def test_no_settings_fit_a_runtime_older_than_the_ops(digits_source):
    """Runtime 2.2 predates FULLY_CONNECTED v9 (2.3.0), the oldest dynamic-range FC any setting gives."""
    with pytest.raises(ConversionError) as exc:
        _run(digits_source, "dynamic", "float32", None, runtime="2.2")
    message = str(exc.value)
    assert "FULLY_CONNECTED v9 needs runtime 2.3.0, profile allows 2.2" in message
    assert "tried 3 setting(s)" in message and "\n" not in message


def test_the_per_channel_fallback_reaches_runtime_2_3(digits_source):
    conversion, _ = _run(digits_source, "dynamic", "float32", None, runtime="2.3")
    versions = {op.name: op.version for op in conversion.ops}
    assert versions["CONV_2D"] <= 4 and versions["FULLY_CONNECTED"] <= 9


def test_request_errors(digits_source, calibration):
    with pytest.raises(ConversionError, match="needs calibration data"):
        _run(digits_source, "int8", "int8", None)
    with pytest.raises(ConversionError, match="takes input_type int8 or uint8 or float32"):
        _run(digits_source, "int8", "int16", calibration)
    with pytest.raises(ConversionError, match="unknown quantization mode"):
        _run(digits_source, "int4", "float32", calibration)


def test_existing_tflite_is_not_converted_again(digits_tflite_int8, tmp_path):
    path = tmp_path / "given.tflite"
    path.write_bytes(digits_tflite_int8)
    conversion, messages = _run(load_source(path), "float32", "float32", None)
    assert conversion.tflite == digits_tflite_int8
    assert conversion.mode == "int8" and conversion.input_type == "int8"
    assert conversion.settings["converted"] is False
    assert any("using it as is" in m for m in messages)


def test_existing_tflite_with_ops_too_new_is_refused(digits_source, tmp_path):
    conversion, _ = _run(digits_source, "dynamic", "float32", None, runtime="2.17")
    path = tmp_path / "fc12.tflite"
    path.write_bytes(conversion.tflite)
    with pytest.raises(ConversionError, match="not converted again.*FULLY_CONNECTED v12 needs runtime 2.17.0"):
        _run(load_source(path), "dynamic", "float32", None, runtime="2.14")


def test_make_converter_rebuilds_the_conversion_for_the_quantization_debugger(digits_source, calibration, digits):
    import tensorflow as tf
    from converter.quantize import make_converter
    conversion, _ = _run(digits_source, "int8", "int8", calibration)
    converter = make_converter(digits_source, conversion, calibration)
    assert converter.target_spec.supported_ops == {tf.lite.OpsSet.TFLITE_BUILTINS_INT8} or \
        list(converter.target_spec.supported_ops) == [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    samples = digits[2][:20]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([x[None]] for x in samples))
    debugger.run()
    stats = debugger.layer_statistics
    assert stats and all("mean_squared_error" in s for s in stats.values())
